"""Greedy decoding from a prefilled (compressed) cache, and the record fields of a press's report.

``model.generate`` decodes a mixkv press's cache; the loops here cover what it cannot: several
caches answered as one batch (:func:`greedy_batch`) and a cache that reports the entries it keeps
as its length (kvpress's, :func:`greedy_with_positions`).
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch

from mixkv.integration.decoder_layout import cache_argument

__all__ = [
    "check_stackable",
    "decode_together",
    "eos_ids",
    "greedy_batch",
    "greedy_with_positions",
    "held_then_causal_mask",
    "kv_fraction",
    "report_fields",
]


def report_fields(report: Any) -> dict[str, Any]:
    """A mixkv press's report as record fields: the full cache's bytes, the mean kept tokens per KV
    head and the compression's seconds."""
    kept = report.kept_tokens
    return {
        "kv_bytes_full": int(report.full_bytes),
        "kept_tokens_mean": float(kept.float().mean().item()) if kept.numel() else 0.0,
        "compression_seconds": float(report.compression_seconds),
    }


def kv_fraction(record: dict[str, Any]) -> float:
    """The fraction of the full cache's bytes a record's cache kept (1 when nothing was held)."""
    return record["kv_bytes"] / record["kv_bytes_full"] if record["kv_bytes_full"] else 1.0


def greedy_batch(
    model: Any,
    cache: Any,
    ids: torch.Tensor,
    n_prefill: int,
    rows: int,
    new_tokens: int,
    eos: set[int],
    session: Any = None,
) -> list[list[int]]:
    """Greedy answers of ``rows`` copies of one prompt whose first ``n_prefill`` tokens each row
    of ``cache`` holds: the rest of the prompt in one forward, then one token per forward. A row
    stops at its first end-of-sequence token; when every layer is packed, the rows that have
    ended are dropped from the cache (:meth:`~mixkv.integration.cache.PackedCompressedLayer.select_rows`,
    the new layers adopted by ``session``), so the later steps compute only the answers still
    running."""
    from mixkv.integration.cache import PackedCompressedLayer

    kwargs: dict[str, Any] = {cache_argument(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    prunable = all(isinstance(layer, PackedCompressedLayer) for layer in cache.layers)
    pending = ids[:, n_prefill:].expand(rows, -1)
    position = n_prefill
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    held = list(range(rows))  # the answers whose rows the cache holds, in its row order
    for _ in range(new_tokens):
        positions = torch.arange(position, position + pending.shape[1], device=ids.device)
        logits = model(input_ids=pending, position_ids=positions.expand(len(held), -1), **kwargs).logits
        position += pending.shape[1]
        chosen = logits[:, -1].argmax(-1)
        for row, token in zip(held, chosen.tolist(), strict=True):
            if not done[row]:
                out[row].append(token)
                done[row] = token in eos
        if all(done):
            break
        if prunable and any(done[row] for row in held):
            keep = [slot for slot, row in enumerate(held) if not done[row]]
            cache.layers = [layer.select_rows(keep) for layer in cache.layers]
            if session is not None:
                session.adopt(cache)
            held, chosen = [held[slot] for slot in keep], chosen[keep]
        pending = chosen[:, None]
    return out


def check_stackable(model: Any, alone: str) -> None:
    """Refuse (ValueError) a model whose caches cannot be stacked into one batch by
    :func:`decode_together`: one with sliding-window layers (their caches evict as they grow);
    ``alone`` names the function that runs a press on its own."""
    from mixkv.integration.decoder_layout import describe_decoder

    layout = describe_decoder(model)
    if len(layout.compressible_layers) != layout.num_layers:
        raise ValueError(
            f"{type(model).__name__} has sliding-window layers, whose caches cannot be stacked; run its "
            f"presses with {alone}"
        )


def decode_together(
    model: Any,
    rows: list[list[Any]],
    ids: torch.Tensor,
    n_prefill: int,
    new_tokens: int,
    eos: set[int],
    press: Any,
) -> tuple[list[list[int]], float]:
    """Greedy answers of one prompt prefilled into several caches (``rows``: each cache's layers,
    e.g. the prompt compressed by several presses), decoded as one batch: the caches are stacked
    (:func:`~mixkv.integration.cache.stack_layers`) and :func:`greedy_batch` runs in a session of
    ``press`` (a mixkv press, whose attention reads the stacked layers). A decoding step then reads
    the weights once for all rows instead of once per row, which is most of a row's cost on a CPU.
    ``rows`` is emptied once stacked, so the callers' caches can be freed before decoding. Returns
    the answers, in row order, and the decoding seconds per row."""
    from transformers import DynamicCache

    from mixkv.integration.cache import stack_layers
    from mixkv.integration.kvpress_bridge import press_applied

    stacked = DynamicCache(config=model.config)
    stacked.layers = [
        stack_layers([row[i] for row in rows], n_prefill, shortened=True) for i in range(len(rows[0]))
    ]
    count = len(rows)
    rows.clear()
    with torch.inference_mode(), press_applied(press, model) as session:
        session.adopt(stacked)
        start = time.perf_counter()
        generated = greedy_batch(model, stacked, ids, n_prefill, count, new_tokens, eos, session)
        seconds = (time.perf_counter() - start) / count
    return generated, seconds


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end an answer: the model's generation config's and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found = set(ids) if isinstance(ids, list) else ({ids} if ids is not None else set())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        found.add(int(tokenizer.eos_token_id))
    return found


def greedy_with_positions(
    model: Any, cache: Any, ids: torch.Tensor, n_prefill: int, new_tokens: int, eos: set[int]
) -> torch.Tensor:
    """Greedy decoding with explicit positions, for presses whose cache reports the number of
    entries it *keeps* as its length (kvpress).

    ``generate`` would take that length for the number of prompt tokens already seen and feed the
    prompt again from the wrong position. Here the rest of the prompt (the question, under the
    query-agnostic protocol) is fed in one forward at its true positions, with an explicit mask:
    every held entry visible, causal among the new tokens (transformers would otherwise derive
    causality from positions the shortened cache does not hold); then one token per forward.
    A cache whose layers hold different numbers of entries gets the rest one token at a time.
    So does a cache whose keys kvpress masks (its head-wise presses) when kvpress finds no fake
    key that cancels every query of the forward (its search raises ``ValueError``, which it does
    for some sets of queries, never for one token's): the cache is cut back to what it held and
    the tokens are fed one by one.
    """
    from mixkv.integration.kvpress_bridge import kvpress_masks_keys

    step_kwargs: dict[str, Any] = {cache_argument(model): cache, "use_cache": True}
    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters

    def forward(feed: torch.Tensor, position: int, held: int) -> torch.Tensor:
        where = torch.arange(position, position + feed.shape[1], device=ids.device)
        if takes_cache_position:
            step_kwargs["cache_position"] = where
        if feed.shape[1] > 1:
            step_kwargs["attention_mask"] = held_then_causal_mask(model, held, feed.shape[1])
        try:
            return model(input_ids=feed, position_ids=where[None], **step_kwargs).logits
        finally:
            step_kwargs.pop("attention_mask", None)

    def token_by_token(pending: torch.Tensor, position: int) -> torch.Tensor:
        for offset in range(pending.shape[1] - 1):
            forward(pending[:, offset : offset + 1], position + offset, 0)
        return forward(pending[:, -1:], position + pending.shape[1] - 1, 0)

    position, pending = n_prefill, ids[:, n_prefill:]
    out: list[int] = []
    while len(out) < new_tokens:
        lengths = {layer.keys.shape[-2] for layer in cache.layers if hasattr(layer, "keys")}
        if len(lengths) != 1:
            logits = token_by_token(pending, position)
        else:
            held = lengths.pop()
            try:
                logits = forward(pending, position, held)
            except ValueError:
                if pending.shape[1] == 1 or not kvpress_masks_keys(model):
                    raise
                for layer in cache.layers:  # the layers before the failing one took the tokens
                    layer.keys, layer.values = layer.keys[..., :held, :], layer.values[..., :held, :]
                logits = token_by_token(pending, position)
        position += pending.shape[1]
        out.append(int(logits[0, -1].argmax()))
        if out[-1] in eos:
            break
        pending = ids.new_tensor([out[-1:]])
    return torch.tensor(out, dtype=torch.long)


def held_then_causal_mask(model: Any, held: int, new: int) -> torch.Tensor:
    """``(1, 1, new, held + new)``: every held entry visible, causal among the ``new`` tokens;
    boolean for sdpa, additive for eager attention."""
    visible = torch.ones(new, held + new, dtype=torch.bool, device=model.device)
    visible[:, held:] = torch.ones(new, new, dtype=torch.bool, device=model.device).tril()
    if getattr(model.config.get_text_config(), "_attn_implementation", "sdpa") != "eager":
        return visible[None, None]
    blocked = torch.finfo(model.dtype).min
    return torch.zeros(visible.shape, dtype=model.dtype, device=model.device).masked_fill(~visible, blocked)[
        None, None
    ]
