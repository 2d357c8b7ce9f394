"""Which press a request runs: its own ``press``/``budget``/``window_size`` or the server's defaults.

Names come from :mod:`mixkv.presses.registry` (``mixkv presses`` lists them), so a name means the
same press here as in every other command. A choice that cannot be built raises
:class:`PressError`, which names the field at fault; the server answers it with a 400.

Example
-------
>>> default = PressChoice("mixkv-snapkv", budget=128)
>>> choice = default.override(press=None, budget=64, window_size=None)
>>> choice.name, choice.budget, choice.window_size
('mixkv-snapkv', 64, 32)
>>> choice.build(context_tokens=300)
MixKVPress(budget=64, ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixkv.presses.registry import KVPRESS_NAMES, NAMES, build_press

__all__ = ["DEFAULT_WINDOW_SIZE", "PressChoice", "PressError"]

#: The presses' observation window when neither the request nor the server names one.
DEFAULT_WINDOW_SIZE = 32


class PressError(ValueError):
    """A press choice that cannot run.

    Attributes
    ----------
    param
        The field at fault: ``"press"``, ``"budget"`` or ``"window_size"``.
    code
        ``"unknown_press"``, ``"missing_budget"``, ``"invalid_budget"``, ``"invalid_press"`` or
        ``"press_not_supported"``.
    """

    def __init__(self, message: str, *, param: str, code: str) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class PressChoice:
    """A method name with its budget and window: what a request runs.

    Attributes
    ----------
    name
        A registry name (``"full"``: no press).
    budget
        Kept prompt tokens per KV head per layer, window included; None for ``"full"`` (a server
        may still hold a default budget for requests that name a press).
    window_size
        The press's observation window (the budget must be above it).
    """

    name: str = "full"
    budget: int | None = None
    window_size: int = DEFAULT_WINDOW_SIZE

    def override(self, *, press: str | None, budget: int | None, window_size: int | None) -> PressChoice:
        """This choice with a request's fields where it gives them."""
        return PressChoice(
            name=self.name if press is None else press,
            budget=self.budget if budget is None else budget,
            window_size=self.window_size if window_size is None else window_size,
        )

    def describe(self) -> dict[str, Any]:
        """``{"press", "budget", "window_size"}`` as the API reports it (no budget for ``"full"``)."""
        if self.name == "full":
            return {"press": "full", "budget": None, "window_size": None}
        return {"press": self.name, "budget": self.budget, "window_size": self.window_size}

    def build(self, *, context_tokens: int) -> Any:
        """The press (None for ``"full"``).

        Parameters
        ----------
        context_tokens
            The prompt's length (only the registry's kvpress names would use it; the server refuses those).

        Raises
        ------
        PressError
            Unknown name, a kvpress name, no budget, or a budget/window the press rejects (e.g. a
            budget not above the window).
        """
        if self.name not in NAMES:
            raise PressError(
                f"Unknown press {self.name!r}; choose from: {', '.join(n for n in NAMES if n not in KVPRESS_NAMES)} "
                "(`mixkv presses` describes them).",
                param="press",
                code="unknown_press",
            )
        if self.name == "full":
            return None
        if self.name in KVPRESS_NAMES:
            raise PressError(
                f"Press {self.name!r} is NVIDIA kvpress's, which runs only under model.generate (mixkv eval); "
                f"this server runs mixkv presses, e.g. {self.name.removeprefix('kvpress-')!r}.",
                param="press",
                code="press_not_supported",
            )
        if self.budget is None:
            raise PressError(
                f"Press {self.name!r} needs a budget (kept tokens per KV head, above its window of "
                f'{self.window_size}): send "budget" with the request or start the server with --budget.',
                param="budget",
                code="missing_budget",
            )
        try:
            return build_press(
                self.name, self.budget, context_tokens=context_tokens, window_size=self.window_size
            )
        except ValueError as exc:
            message = str(exc)
            if "window_size must" in message:
                raise PressError(message, param="window_size", code="invalid_window_size") from exc
            if "budget" in message:
                raise PressError(message, param="budget", code="invalid_budget") from exc
            raise PressError(message, param="press", code="invalid_press") from exc
