"""Running a foreign press (kvpress's) on an example's full-cache prefill instead of a new prefill.

A kvpress press compresses inside forward hooks on the attention modules, *after* each module has
attended over the whole prompt: the hidden states that reach the next layer, and so every layer's
inputs, are those of a full-cache prefill whatever the press does. kvpress only compresses a
prefill that starts at position 0, so each kvpress cell of a grid used to redo the whole prefill.
Here the full-cache prefill of an example is run once while every attention module's inputs are
recorded (:func:`prefill_with_inputs`); a kvpress cell then copies that cache and calls its press's
hooks with the recorded inputs (:func:`replayed_prefill`), which is the computation the press
would do in its own prefill, up to the float rounding of a prefill run in two forwards (prefix,
then tail). Tests compare it with a from-scratch run.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mixkv.integration.decoder_layout import prefill

__all__ = ["RecordedPrefill", "prefill_with_inputs", "recording_attention_inputs", "replayed_prefill"]

#: Keyword inputs of an attention module that run along the sequence, with their sequence axis.
_SEQUENCE_AXES = {"hidden_states": 1, "cache_position": -1, "position_ids": -1}
#: Keyword names under which transformers passes the cache to an attention module.
_CACHE_KEYS = ("past_key_values", "past_key_value", "cache")


@dataclass(frozen=True)
class RecordedPrefill:
    """The full cache of an example's first ``tokens`` prefill tokens and, per attention module,
    the keyword inputs it received over those tokens (sequence inputs joined across forwards).
    Never modified; :func:`replayed_prefill` works on a copy of ``cache``."""

    cache: Any
    tokens: int
    seconds: float
    attention_inputs: dict[torch.nn.Module, dict[str, Any]]


def _is_attention(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "layer_idx", None), int) and "Attention" in type(module).__name__


def _join(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """One module's keyword inputs over consecutive forwards, as one forward would have had them."""
    joined = dict(chunks[-1])
    for key, axis in _SEQUENCE_AXES.items():
        if isinstance(joined.get(key), torch.Tensor):
            joined[key] = torch.cat([c[key] for c in chunks], dim=axis)
    if isinstance(joined.get("position_embeddings"), tuple):  # RoPE (cos, sin), each (B, N, d)
        parts = zip(*(c["position_embeddings"] for c in chunks), strict=True)
        joined["position_embeddings"] = tuple(torch.cat(list(p), dim=-2) for p in parts)
    # The mask of the last forward covers only its queries; no hook should read a partial one.
    joined["attention_mask"] = None
    return joined


@contextlib.contextmanager
def recording_attention_inputs(
    model: torch.nn.Module,
) -> Iterator[dict[torch.nn.Module, list[dict[str, Any]]]]:
    """Record the keyword inputs of every attention module (one dict per forward) while active."""
    recorded: dict[torch.nn.Module, list[dict[str, Any]]] = {}

    def record(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if args:
            raise ValueError(
                f"{type(module).__name__} received positional inputs; only attention modules called with "
                "keyword inputs (transformers' current models) can be recorded for a press replay"
            )
        recorded.setdefault(module, []).append(dict(kwargs))

    handles = [
        m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules() if _is_attention(m)
    ]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def prefill_with_inputs(
    model: Any, input_ids: torch.Tensor, tokens: int, prefix: Any = None
) -> RecordedPrefill:
    """The full-cache prefill of ``input_ids[:, :tokens]`` with every attention module's inputs.

    ``prefix``, a :class:`~mixkv.eval.text_example_run.SharedPrefix` recorded with ``record_inputs=True``,
    supplies its first tokens: only the rest is computed (its time is added)."""
    from transformers import DynamicCache

    start_at = 0 if prefix is None else prefix.tokens
    if prefix is not None and prefix.attention_inputs is None:
        raise ValueError("the shared prefix was not recorded with its attention inputs (record_inputs=True)")
    cache = DynamicCache(config=model.config) if prefix is None else copy.deepcopy(prefix.cache)
    with torch.inference_mode(), recording_attention_inputs(model) as recorded:
        start = time.perf_counter()
        prefill(model, input_ids[:, start_at:tokens], cache)
        seconds = time.perf_counter() - start + (0.0 if prefix is None else prefix.seconds)
    earlier = {} if prefix is None else prefix.attention_inputs
    inputs = {module: _join([*earlier.get(module, []), *chunks]) for module, chunks in recorded.items()}
    return RecordedPrefill(cache, tokens, seconds, inputs)


def _hook_ids(model: torch.nn.Module) -> dict[torch.nn.Module, tuple[set[int], set[int]]]:
    return {m: (set(m._forward_hooks), set(m._forward_pre_hooks)) for m in model.modules()}


@contextlib.contextmanager
def replayed_prefill(
    model: torch.nn.Module, press: Any, recorded: RecordedPrefill
) -> Iterator[tuple[Any, float]]:
    """Enter ``press(model)`` and apply it to a copy of ``recorded``'s cache without a prefill.

    ``press`` is a kvpress-style press: a context manager that adds forward hooks (with keyword
    inputs) to attention modules and compresses the cache in them during a prefill. The hooks it
    adds are called, in module order, with the recorded inputs and the copied cache, as its own
    prefill would call them. Yields ``(cache, seconds spent in the hooks)``; the press stays
    active inside the block, for decoding (kvpress's head-wise presses mask keys at decoding).

    Raises
    ------
    ValueError
        The press adds pre-hooks, hooks without keyword inputs, or hooks on modules whose inputs
        were not recorded: it cannot be replayed (prefill from scratch instead).
    """
    from mixkv.integration.kvpress_bridge import press_applied

    before = _hook_ids(model)
    with press_applied(press, model):
        added: list[tuple[torch.nn.Module, Any]] = []
        for module in model.modules():
            hooks, pre_hooks = before.get(module, (set(), set()))
            if set(module._forward_pre_hooks) - pre_hooks:
                raise ValueError(
                    f"{type(press).__name__} adds forward pre-hooks, which a replay cannot reproduce; "
                    "prefill from scratch (--no-shared-prefill)"
                )
            for hook_id in [h for h in module._forward_hooks if h not in hooks]:  # in registration order
                if (
                    hook_id not in module._forward_hooks_with_kwargs
                    or module not in recorded.attention_inputs
                ):
                    raise ValueError(
                        f"{type(press).__name__} hooks {type(module).__name__} in a way a replay cannot "
                        "reproduce (only hooks with keyword inputs on attention modules); prefill from "
                        "scratch (--no-shared-prefill)"
                    )
                added.append((module, module._forward_hooks[hook_id]))
        cache = copy.deepcopy(recorded.cache)
        start = time.perf_counter()
        with torch.inference_mode():
            for module, hook in added:
                kwargs = dict(recorded.attention_inputs[module])
                for key in _CACHE_KEYS:
                    if key in kwargs:
                        kwargs[key] = cache
                # The module's output is not recorded: the hooks replayed here read the cache, the
                # inputs and the attention weights, which are None under sdpa / flash attention.
                hook(module, (), kwargs, (None, None))
        yield cache, time.perf_counter() - start
