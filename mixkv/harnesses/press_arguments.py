"""What every harness model shares: the press arguments it takes
(``press=mixkv-adakv,budget=128,window_size=16``) and the ``mixkv <harness>`` command wrapper."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from mixkv.integration.session import PressSession
from mixkv.presses.base import BasePress
from mixkv.presses.registry import KVPRESS_NAMES, from_name, list_presses

__all__ = ["attached", "run_harness_cli", "split_press_arguments"]


def split_press_arguments(kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Pop the press arguments (``press``, ``budget``, ``compression_ratio`` and the press's own
    options) from a harness model's keyword arguments and build the press (None for ``full``).

    Raises
    ------
    ValueError
        For kvpress names (their caches need their own decoding), or what
        :func:`mixkv.presses.from_name` refuses.
    """
    name = str(kwargs.pop("press", "mixkv-snapkv"))
    if name in KVPRESS_NAMES:
        raise ValueError(f"press={name} is a kvpress press; the harness models take mixkv presses only.")
    entries = {e.name: e for e in list_presses()}
    accepted = {"budget", "compression_ratio", *(entries[name].parameters() if name in entries else ())}
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in accepted}
    budget = options.pop("budget", None)
    return from_name(name, None if budget is None else int(budget), **options), kwargs


@contextlib.contextmanager
def attached(press: BasePress | None, model: torch.nn.Module) -> Iterator[PressSession | None]:
    """``with press(model)``, or nothing for the full cache (``press`` None)."""
    if press is None:
        yield None
    else:
        with press(model) as session:
            yield session


def run_harness_cli(program: str, cli_evaluate: Callable[[], Any], argv: Sequence[str] | None) -> int:
    """Run a harness's command line (which reads ``sys.argv``) with ``argv``, restoring ``sys.argv``."""
    saved = sys.argv
    sys.argv = [program, *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
