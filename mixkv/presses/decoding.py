"""Bounded decoding: compress the cache again every ``interval`` generated tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mixkv.presses.base import BasePress

if TYPE_CHECKING:
    from mixkv.integration.session import PressSession
    from mixkv.presses.compression_report import CompressionReport


@dataclass
class DecodingPress:
    """Keep the cache bounded during generation by compressing it again with ``press``.

    The prompt is compressed by ``press`` as usual. Afterwards, once a layer holds ``interval``
    entries per KV head more than ``max(budget, what it held after its last compression)``, it is
    scored again by ``press`` over everything it holds, with the queries of the latest
    ``press.window_size`` tokens as observation window, and cut back to ``budget`` entries per KV
    head (on average over the layer's heads; ``press``'s policy shares them between layers and
    heads as it does for the prompt). A layer therefore never holds more than its prompt budget
    plus ``interval`` entries per KV head, however long the answer; until that bound is reached
    the cache, and so the output, is exactly the plain press's.

    Parameters
    ----------
    press : BasePress
        Any mixkv press (MixKV on every base, head-wise policies included).
    budget : int, optional
        Entries per KV head kept at each decoding compression, window included. Defaults to
        ``press.budget``; required when the press is given a ``compression_ratio``.
    interval : int, default 32
        Generated tokens between two compressions (the bound's slack).

    Usage::

        with DecodingPress(MixKVPress(budget=128), interval=64)(model):
            model.generate(**inputs, max_new_tokens=4096)

    ``compressions`` counts the layer compressions done while decoding (all sessions);
    ``target`` is the resolved budget.
    """

    press: BasePress
    budget: int | None = None
    interval: int = 32
    compressions: int = field(default=0, init=False, compare=False)
    target: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.press, BasePress):
            raise TypeError(f"DecodingPress wraps a mixkv press, got {type(self.press).__name__}")
        if self.budget is None:
            if self.press.budget is None:
                raise ValueError(
                    "DecodingPress needs budget= (entries per KV head kept while decoding) when the wrapped "
                    "press is given a compression_ratio"
                )
            self.budget = self.press.budget
        self.target = self.budget
        if (
            isinstance(self.budget, bool)
            or not isinstance(self.budget, int)
            or self.budget <= self.press.window_size
        ):
            raise ValueError(
                f"budget must be an integer larger than the press's window_size ({self.press.window_size}), "
                f"got {self.budget!r}"
            )
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1 (generated tokens), got {self.interval!r}")

    @property
    def last_report(self) -> CompressionReport | None:
        """The wrapped press's report of the last prompt."""
        return self.press.last_report

    def __call__(self, model: torch.nn.Module) -> PressSession:
        """Attach the press, with bounded decoding, to ``model`` for a ``with`` block."""
        from mixkv.integration.session import PressSession

        return PressSession(self.press, model, decoding=self)
