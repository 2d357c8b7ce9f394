"""Compressing a request's paged KV cache at the end of its prefill, inside transformers' engine.

Written against transformers 5.25 (``transformers.generation.continuous_batching``). Per forward:

1. :meth:`PagedCompressor.begin_batch` (after the batch processor prepared the batch) notes which
   requests the forward holds, where their queries sit, and whose prefill it completes; it adds
   each request's position shift to ``position_ids`` so tokens after a compression keep their true
   RoPE positions.
2. The attention function registered over the CB-only name ``paged|eager`` runs the model's own
   attention, then hands each layer to :meth:`PagedCompressor.attention`. For a request whose
   prefill completes in this forward it scores the whole prompt with the queries of its last
   ``window_size`` tokens (kept across the forwards of a chunked prefill), exactly as mixkv's
   one-go prefill does (:func:`~mixkv.integration.layer_compression.select_kept_entries`), and
   writes the kept entries of every KV head into the request's slots ``0..k-1`` through the
   allocator's own ``update``.
3. :meth:`PagedCompressor.finish_batch` (before the batch processor appends the new tokens) gives
   the request's pages beyond ``ceil(k / page_size)`` back to the pool and sets its cache length
   (``position_offset``) to ``k``; the position shift ``prompt - k`` is kept on the request state.

With per-layer budgets (PyramidKV) layer ``l`` keeps ``k_l`` entries in slots ``0..k_l-1``, the
request's length is ``max_l k_l``, and :meth:`PagedCompressor.attention` masks slots
``k_l..max-1`` of layer ``l`` for that request in every later forward.

Under a :class:`~mixkv.DecodingPress` the same happens while decoding, with the rule of
:meth:`~mixkv.integration.cache_compressor.CacheCompressor.on_decode`: the queries of the
request's last ``window_size`` tokens are kept per layer across decode steps, and once the request
holds ``interval`` entries more than ``max(target, what it held after its last compression)``,
everything it holds is scored with them and cut to ``target`` entries (the window included), in
its first slots; the pages beyond go back to the pool and the position shift grows by what was cut.

The registration is global but dispatches per attention module: modules no manager is bound to
get the original ``paged|eager`` function, and the original is restored when the last manager
unbinds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers.modeling_utils import AttentionInterface

from mixkv.integration.decoder_layout import DecoderLayout
from mixkv.integration.layer_compression import select_kept_entries
from mixkv.integration.paged_support import press_name
from mixkv.presses.base import BasePress, ScoringContext
from mixkv.presses.decoding import DecodingPress

PAGED_NAME = "paged|eager"
# Attributes mixkv keeps on transformers' RequestState objects (a soft reset builds a fresh state,
# a fork deep-copies them).
DELTA_ATTR = "mixkv_position_delta"
QUERIES_ATTR = "mixkv_window_queries"
HELD_ATTR = "mixkv_held_after_compression"  # entries per layer right after the last compression
# layer -> (kept, cache length): slots kept..length-1 of that layer are stale (per-layer budgets)
HOLES_ATTR = "mixkv_layer_holes"

AnyPress = BasePress | DecodingPress

AttentionFn = Callable[..., Any]


@dataclass
class Scheduled:
    """One request of the forward being run."""

    state: Any  # transformers' RequestState
    q_start: int
    q_len: int
    completes_prefill: bool
    press: BasePress | None  # the press scoring this forward's request (a DecodingPress's inner press)
    compresses: bool  # a press whose budget the prompt exceeds
    decoding: DecodingPress | None = None  # bounded decoding: queries tracked, compressed again
    decodes: bool = False  # a decode step (the request's prefill is done)


@dataclass
class Compression:
    """One request compressed in the forward being run, until :meth:`PagedCompressor.finish_batch`."""

    state: Any
    press: BasePress
    prompt_tokens: int  # entries held before the compression (the prompt, or the cache while decoding)
    kept_tokens: int  # the most any layer kept (the request's new cache length)
    seconds: float = 0.0
    kept_by_layer: dict[int, int] = field(default_factory=dict)
    decodes: bool = False

    @property
    def layers(self) -> set[int]:
        return set(self.kept_by_layer)


@dataclass(frozen=True)
class PrefillCompression:
    """What happened to one request's cache at the end of its prefill (compressed or not).

    Attributes
    ----------
    request_id : str
    press : str or None
        The press's registry name (``"mixkv-snapkv"``), None for a full-cache request.
    prompt_tokens : int
        Tokens the prefill put in the cache.
    kept_tokens : int
        Entries per KV head and layer kept (``prompt_tokens`` when nothing was compressed); with
        per-layer budgets (PyramidKV), the most any layer kept: the request's cache length.
    freed_pages : int
        Pages (``page_size`` tokens of every layer) given back to the pool.
    seconds : float
        Time spent scoring and rewriting the cache.
    """

    request_id: str
    press: str | None
    prompt_tokens: int
    kept_tokens: int
    freed_pages: int
    seconds: float

    @property
    def compressed(self) -> bool:
        return self.kept_tokens < self.prompt_tokens


class PagedCompressor:
    """Compresses the prompts of one manager's requests in its paged cache.

    Parameters
    ----------
    layout : DecoderLayout
        The model's decoder (full-attention layers only).
    original : callable
        The attention function the model runs (``sdpa`` or ``paged|eager``'s eager function).
    press_for : callable
        Request id -> the press of that request (None: full cache; a DecodingPress: bounded decoding).
    """

    def __init__(
        self, layout: DecoderLayout, original: AttentionFn, press_for: Callable[[str], AnyPress | None]
    ) -> None:
        self.layout = layout
        self.original = original
        self.press_for = press_for
        self.cache: Any = None  # transformers' PagedAttentionCache, set by the manager
        self.batch: list[Scheduled] = []
        self.pending: dict[str, Compression] = {}
        self.decode_compressions = 0  # layer compressions done while decoding (all requests)

    # -- around the forward ------------------------------------------------------------------------
    def begin_batch(self, requests_in_batch: list[Any], position_ids: torch.Tensor) -> None:
        """Note the forward's requests and shift their position ids by their compressed tokens."""
        self.batch = []
        self.pending = {}
        start = 0
        shifts: list[int] = []
        for future in requests_in_batch:
            state = future.state
            completes = bool(future.has_new_token) and not state.generated_tokens
            prefilling = completes or not future.has_new_token
            chosen = self.press_for(state.request_id)
            decoding = chosen if isinstance(chosen, DecodingPress) else None
            press: BasePress | None = None
            if decoding is not None:
                press = decoding.press
            elif prefilling and isinstance(chosen, BasePress):
                press = chosen
            prompt = len(state.initial_tokens)
            compresses = prefilling and press is not None and prompt > press.sequence_budget(prompt)
            self.batch.append(
                Scheduled(
                    state,
                    start,
                    future.query_length,
                    completes,
                    press,
                    compresses,
                    decoding,
                    decodes=not prefilling,
                )
            )
            shifts.append(getattr(state, DELTA_ATTR, 0))
            start += future.query_length
        if any(shifts):
            lengths = torch.tensor([item.q_len for item in self.batch])
            shift = torch.repeat_interleave(torch.tensor(shifts, dtype=position_ids.dtype), lengths)
            position_ids[:start] += shift.to(position_ids.device)

    def finish_batch(self) -> list[PrefillCompression]:
        """Give back the pages compressed requests no longer need and set their cache lengths; returns
        what the prefills completed in this forward kept (decode-time compressions are not reported)."""
        finished: list[PrefillCompression] = []
        for item in self.batch:
            state = item.state
            done = self.pending.get(state.request_id)
            if item.decodes:
                if done is not None:
                    self._shrink(state, done)
                continue
            if not item.completes_prefill:
                continue
            if hasattr(state, QUERIES_ATTR) and item.decoding is None:
                delattr(state, QUERIES_ATTR)
            if done is None:
                prompt = state.position_offset
                name = None if item.press is None else press_name(item.press)
                finished.append(PrefillCompression(state.request_id, name, prompt, prompt, 0, 0.0))
                continue
            freed = self._shrink(state, done)
            finished.append(
                PrefillCompression(
                    state.request_id,
                    press_name(done.press),
                    done.prompt_tokens,
                    done.kept_tokens,
                    freed,
                    done.seconds,
                )
            )
        self.batch = []
        self.pending = {}
        return finished

    def _shrink(self, state: Any, done: Compression) -> int:
        """Cut a compressed request's cache to what it kept (the first ``kept_tokens`` slots of every
        layer): free the pages beyond, set its length, grow its position shift. Returns pages freed."""
        missing = set(self.layout.compressible_layers) - done.layers
        if missing or state.position_offset != done.prompt_tokens:
            raise RuntimeError(
                f"request {state.request_id}: compressed layers {sorted(done.layers)} of "
                f"{len(self.layout.compressible_layers)}, cache length {state.position_offset} for "
                f"{done.prompt_tokens} held tokens; the engine no longer matches what mixkv expects"
            )
        holes = {
            layer: (kept, done.kept_tokens)
            for layer, kept in done.kept_by_layer.items()
            if kept < done.kept_tokens
        }
        if holes:
            setattr(state, HOLES_ATTR, holes)
        elif hasattr(state, HOLES_ATTR):
            delattr(state, HOLES_ATTR)
        freed = 0
        for allocator in self.cache.cache_allocators.values():
            table = allocator.block_table[state.request_id]
            keep = math.ceil(done.kept_tokens / allocator.tokens_per_page)
            released = [block for block in table[keep:] if allocator.ledger.release(block)]
            del table[keep:]
            self.cache.pool.free_blocks(allocator.index, released)
            freed += len(released)
        state.position_offset = done.kept_tokens
        setattr(state, DELTA_ATTR, getattr(state, DELTA_ATTR, 0) + done.prompt_tokens - done.kept_tokens)
        setattr(state, HELD_ATTR, done.kept_tokens)
        return freed

    # -- inside the forward --------------------------------------------------------------------------
    def attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's attention, then compression of the requests whose prefill ends here."""
        layer_idx = int(module.layer_idx)  # type: ignore[arg-type]
        attention_mask = self._mask_holes(layer_idx, attention_mask, kwargs)
        output = self.original(module, query, key, value, attention_mask, **kwargs)
        if not any(item.compresses or item.decoding is not None for item in self.batch):
            return output
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        cu_k = kwargs["cu_seq_lens_k"].tolist()  # this layer's group (cache.update narrowed it)
        for i, item in enumerate(self.batch):
            press = item.press
            if press is None or not (item.compresses or item.decoding is not None):
                continue
            queries = self._window_queries(item, layer_idx, query)
            start, end = cu_k[i], cu_k[i + 1]
            length = end - start
            if item.decodes:
                assert item.decoding is not None
                budget = item.decoding.target
                floor = max(getattr(item.state, HELD_ATTR, 0), budget)
                if length < floor + item.decoding.interval or queries.shape[2] < press.window_size:
                    continue
                seen = length + getattr(item.state, DELTA_ATTR, 0)  # real tokens seen, as on_decode counts
                item.decoding.compressions += 1
                self.decode_compressions += 1
            else:
                if not item.completes_prefill or not item.compresses:
                    continue
                budget = press.sequence_budget(length)
                if length <= budget:
                    continue
                seen = length
            began = time.perf_counter()
            kept = self._compress(
                item, layer_idx, queries, key, value, start, end, budget, float(scaling), seen
            )
            done = self.pending.get(item.state.request_id)
            if done is None:
                done = self.pending[item.state.request_id] = Compression(
                    item.state, press, length, kept, decodes=item.decodes
                )
            elif done.decodes and done.kept_tokens != kept:
                raise RuntimeError(
                    f"{type(press).__name__} kept {kept} entries in layer {layer_idx} but {done.kept_tokens} "
                    "in an earlier layer while decoding; bounded decoding needs the same count in every layer"
                )
            done.kept_by_layer[layer_idx] = kept
            done.kept_tokens = max(done.kept_tokens, kept)
            done.seconds += time.perf_counter() - began
        return output

    def _mask_holes(
        self, layer_idx: int, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]
    ) -> torch.Tensor | None:
        """Hide, in this layer, the stale slots of requests whose layers kept different counts.

        A request compressed with per-layer budgets holds ``k_l`` entries of layer ``l`` in slots
        ``0..k_l-1`` and has one cache length ``K = max_l k_l`` for every layer; slots
        ``k_l..K-1`` of layer ``l`` are masked (columns of the packed key sequence, from
        ``cu_seq_lens_k``), in a copy of the batch's mask (which every layer shares).
        """
        holes = [
            (i, getattr(item.state, HOLES_ATTR)[layer_idx])
            for i, item in enumerate(self.batch)
            if layer_idx in getattr(item.state, HOLES_ATTR, ())
        ]
        if not holes:
            return attention_mask
        if attention_mask is None or attention_mask.dim() != 4:
            raise RuntimeError(
                "per-layer budgets in continuous batching need the batch's 4-D attention mask (sdpa or eager)"
            )
        cu_k = kwargs["cu_seq_lens_k"].tolist()
        cu_q = kwargs["cu_seq_lens_q"].tolist()
        mask = attention_mask.clone()
        hidden = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        for i, (kept, length) in holes:
            mask[..., cu_q[i] : cu_q[i + 1], cu_k[i] + kept : cu_k[i] + length] = hidden
        return mask

    def _window_queries(self, item: Scheduled, layer_idx: int, query: torch.Tensor) -> torch.Tensor:
        """The last ``window_size`` queries of the request so far, across its chunks (and decode steps,
        under bounded decoding)."""
        assert item.press is not None
        window = item.press.window_size
        mine = query[:, :, item.q_start : item.q_start + item.q_len]
        saved: dict[int, torch.Tensor] | None = getattr(item.state, QUERIES_ATTR, None)
        if saved is not None and layer_idx in saved and mine.shape[2] < window:
            mine = torch.cat([saved[layer_idx], mine], dim=2)
        recent = mine[:, :, -window:]
        if not item.completes_prefill or item.decoding is not None:
            if saved is None:
                saved = {}
                setattr(item.state, QUERIES_ATTR, saved)
            saved[layer_idx] = recent.clone()  # a view would keep the whole forward's queries alive
        return recent

    def _compress(
        self,
        item: Scheduled,
        layer_idx: int,
        queries: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        start: int,
        end: int,
        budget: int,
        scaling: float,
        seen: int,
    ) -> int:
        """Score what one request holds in one layer (``seen``: the real tokens it has seen), write
        what it keeps to its first slots; returns the number kept per KV head."""
        press = item.press
        assert press is not None
        keys, values = key[:, :, start:end], value[:, :, start:end]
        length, device = end - start, key.device
        ctx = ScoringContext(
            queries=queries,
            keys=keys,
            values=values,
            key_mask=torch.ones((1, length), dtype=torch.bool, device=device),
            scaling=scaling,
            layer_idx=layer_idx,
            compressible_layers=self.layout.compressible_layers,
            budgets=torch.tensor([budget], dtype=torch.long, device=device),
            kernel_size=press.kernel_size,
            pooling=press.pooling,
            context_lengths=torch.tensor([seen], dtype=torch.long, device=device),
        )
        kept = select_kept_entries(press, ctx, torch.ones(1, dtype=torch.bool, device=device))
        counts = kept.prefix_counts[0]
        if bool((counts != counts[0]).any()):
            raise RuntimeError(
                f"{type(press).__name__} kept {counts.tolist()} entries per KV head in layer {layer_idx}; a "
                "paged cache slot holds every KV head, so every head must keep the same number"
            )
        prefix_kept = int(counts[0])
        merged = press.merge_evicted(ctx, kept.indices, kept.valid)
        if merged is not None:  # a merging press (LOOK-M) changes the kept entries, not which are kept
            keys, values = merged
        window = press.window_size
        heads, head_dim = keys.shape[1], keys.shape[3]
        positions = torch.cat(
            [
                kept.indices[0, :, :prefix_kept],
                torch.arange(length - window, length, device=device).expand(heads, window),
            ],
            dim=1,
        )  # (Hkv, k): the kept prefix entries of each head, then the window
        gather = positions.unsqueeze(-1).expand(-1, -1, head_dim)
        kept_keys = keys[0].gather(1, gather).transpose(0, 1).contiguous()  # (k, Hkv, D)
        kept_values = values[0].gather(1, gather).transpose(0, 1).contiguous()
        allocator = self.cache.layer_to_allocator[layer_idx]
        count = prefix_kept + window
        slots = allocator.get_write_indices(item.state.request_id, 0, count)
        destination = torch.tensor(slots, dtype=torch.long, device=device)
        nothing = torch.empty(0, dtype=torch.long, device=device)
        allocator.update(kept_keys, kept_values, layer_idx, nothing, destination)  # write-only path
        return count


# -- the registration over "paged|eager" --------------------------------------------------------------
_BOUND: dict[int, PagedCompressor] = {}
_saved: list[AttentionFn] = []  # the original "paged|eager" function while registered


def _dispatch(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    compressor = _BOUND.get(id(module))
    if compressor is None:
        return _saved[0](module, query, key, value, attention_mask, **kwargs)
    return compressor.attention(module, query, key, value, attention_mask, **kwargs)


def _registered() -> AttentionFn:
    return cast(AttentionFn, AttentionInterface._global_mapping[PAGED_NAME])


def original_paged_function() -> AttentionFn:
    """transformers' own ``paged|eager`` function (also while mixkv's dispatcher is registered)."""
    return _saved[0] if _saved else _registered()


def bind(modules: list[torch.nn.Module], compressor: PagedCompressor) -> None:
    """Route the ``paged|eager`` calls of ``modules`` to ``compressor`` (registering the dispatcher)."""
    if any(id(module) in _BOUND for module in modules):
        raise ValueError("another mixkv continuous-batching manager is attached to this model; stop it first")
    if not _BOUND:
        _saved[:] = [_registered()]
        AttentionInterface.register(PAGED_NAME, _dispatch)
    for module in modules:
        _BOUND[id(module)] = compressor


def unbind(compressor: PagedCompressor) -> None:
    """Undo :func:`bind`; the last one restores transformers' ``paged|eager`` function."""
    for key in [key for key, bound in _BOUND.items() if bound is compressor]:
        del _BOUND[key]
    if not _BOUND and _saved:
        AttentionInterface.register(PAGED_NAME, _saved.pop())
