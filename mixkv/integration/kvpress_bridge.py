"""kvpress presses at run time: the state kvpress's head-wise presses leave on a model's modules.

kvpress's AdaKV-style presses leave keys to mask on each attention module, applied by kvpress's
attention patch to later forwards; these helpers make a kvpress run leave nothing behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from mixkv.integration.tensor_parallel import refuse_tensor_parallel

__all__ = ["clear_kvpress_masks", "kvpress_masks_keys", "press_applied"]


def kvpress_masks_keys(model: torch.nn.Module) -> bool:
    """Whether a kvpress head-wise press (AdaKV...) left keys to mask on ``model``'s attention
    modules: kvpress's attention patch then replaces them, in every forward, by fake keys that
    must score ``exp(<q, k>) = 0`` for all of that forward's queries."""
    return any(getattr(module, "masked_key_indices", None) is not None for module in model.modules())


def clear_kvpress_masks(model: torch.nn.Module) -> None:
    """Drop the keys kvpress's head-wise presses (AdaKV...) leave on the attention modules to mask
    at decoding. kvpress's attention patch applies them to every later forward whose queries are
    fewer than its keys, and clears them only at a prefill from position 0: a later run that
    continues a cache (a shared prefix, a chunked prefill) would otherwise attend with another
    prompt's keys masked, and its cache's keys overwritten."""
    for module in model.modules():
        if getattr(module, "masked_key_indices", None) is not None:
            setattr(module, "masked_key_indices", None)  # noqa: B010 (not a declared attribute)


@contextlib.contextmanager
def press_applied(press: Any, model: torch.nn.Module) -> Iterator[Any]:
    """``with press(model)`` (nothing for None) that leaves no kvpress state on ``model``: masks
    an earlier kvpress run left are cleared on entry and the press's own on exit
    (:func:`clear_kvpress_masks`). Yields what ``press(model)`` gives.

    Raises
    ------
    ValueError
        For a kvpress press on a tensor-parallel model.
    """
    if press is None:
        yield None
        return
    if type(press).__module__.split(".")[0] == "kvpress":
        refuse_tensor_parallel(
            model,
            f"kvpress's {type(press).__name__}",
            "kvpress sees only the KV heads of its own rank (its head-wise budgets would differ from "
            "one process); use the mixkv press of the same method",
        )
    clear_kvpress_masks(model)
    try:
        with press(model) as entered:
            yield entered
    finally:
        clear_kvpress_masks(model)
