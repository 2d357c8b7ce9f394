"""When a session compresses the layers of a cache, and what it remembers about each cache.

A prompt forward (one go, or one chunk) compresses each compressible layer at the end of its
attention, scored over everything the layer holds with the queries of the prompt's last
``window_size`` tokens so far (kept across chunks), and books what it kept for the press's report.
Under a :class:`~mixkv.DecodingPress`, a layer is compressed again once it holds ``interval``
entries per KV head more than after its last compression. Which entries a compression keeps is
:func:`~mixkv.integration.layer_compression.compress_layer`'s business.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache

from mixkv.integration.cache import CompressedLayer
from mixkv.integration.decoder_layout import DecoderLayout
from mixkv.integration.layer_compression import compress_layer
from mixkv.integration.layer_tensors import (
    AttentionCall,
    HeldLayer,
    held_layer,
    key_mask_from_attention_mask,
)
from mixkv.integration.prefill_report import PrefillRecord
from mixkv.integration.tensor_parallel import check_local_heads
from mixkv.presses.base import ScoringContext
from mixkv.presses.head_shard import HeadShard

if TYPE_CHECKING:
    from mixkv.presses.base import BasePress
    from mixkv.presses.decoding import DecodingPress


@dataclass
class CacheState:
    """What the session remembers about one cache between forwards."""

    lengths: torch.Tensor | None = None  # real prompt tokens seen so far (B,)
    prompt_tokens: int = 0  # positions the prompt covers (padding included)
    seconds: float = 0.0  # time spent compressing the prompt
    # layer -> queries of the last `window_size` tokens (a chunk may be shorter than the window)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    # layer -> their rotary cos/sin tables (where the model gave them)
    rotary: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)
    # layer -> entries per KV head right after its last compression (bounded decoding)
    held_after_compression: dict[int, float] = field(default_factory=dict)
    # ids of the whole prompt its first prompt forward completes (``declare_prompt``), and the
    # decoder's input embeddings of that prompt where given (KVzip's repeat of an image prompt)
    prompt_ids: torch.Tensor | None = None
    prompt_embeddings: torch.Tensor | None = None


class CacheCompressor:
    """Compresses the caches one press session sees, layer by layer, and keeps their state.

    Parameters
    ----------
    press : BasePress
        Scores and budgets.
    layout : DecoderLayout
        The model's decoder (which layers are compressible, visual placeholders).
    decoding : DecodingPress, optional
        Bounded decoding: compress again while generating.
    rope_frequencies : dict[int, Tensor], optional
        Inverse frequencies of each compressible layer's rotary embedding, for presses that need them.
    head_shard : HeadShard, optional
        Under tensor parallelism, this rank's share of every layer's KV heads: head-wise budgets,
        the decisions of bounded decoding and the report are then computed over all ranks' heads.
    """

    def __init__(
        self,
        press: BasePress,
        layout: DecoderLayout,
        decoding: DecodingPress | None,
        rope_frequencies: dict[int, torch.Tensor] | None = None,
        head_shard: HeadShard | None = None,
    ) -> None:
        self.press = press
        self.layout = layout
        self.decoding = decoding
        self.rope_frequencies = rope_frequencies or {}
        self.head_shard = head_shard
        # Layers this session made (compressions and forks): detached on exit. Weak, so that forks
        # dropped by their user are freed before the session ends.
        self.created: weakref.WeakSet[CompressedLayer] = weakref.WeakSet()
        # Where compressions look up and leave window importance: the recording being made or
        # compressed (None otherwise).
        self.importance_memo: dict[tuple[int, int, int, str], torch.Tensor] | None = None
        # layer -> KVzip scores of its entries (B, Hkv, N), while a reconstructed prompt is compressed
        self.reconstruction_scores: dict[int, torch.Tensor] | None = None
        self._states: weakref.WeakKeyDictionary[Cache, CacheState] = weakref.WeakKeyDictionary()
        self._record: PrefillRecord | None = None

    def state(self, cache: Cache) -> CacheState:
        """What is remembered about ``cache`` (created empty on first use)."""
        state = self._states.get(cache)
        if state is None:
            state = self._states[cache] = CacheState()
        return state

    def clear(self) -> None:
        """Forget every cache (the session ends); the created layers are the session's to detach."""
        self.created.clear()
        self._states.clear()
        self._record = None

    def on_prefill(self, call: AttentionCall, cache: Cache, input_ids: torch.Tensor | None) -> None:
        """Compress a layer at the end of a prompt forward (or chunk) and keep the report's books.

        ``input_ids`` are the forward's ids (for the report's visual token counts).
        """
        layer_idx, query, keys = call.layer_idx, call.query, call.keys
        # Sliding-window layers are skipped before their mask is read: it hides more than padding.
        if layer_idx not in self.layout.compressible_layers:
            return
        check_local_heads(self.head_shard, keys)
        state = self.state(cache)
        held = held_layer(cache.layers[layer_idx], call)
        record = self._record
        if layer_idx == self.layout.compressible_layers[0] or record is None:
            row = key_mask_from_attention_mask(
                call.attention_mask, keys.shape[0], held.seen_tokens, keys.device
            )
            # A cache's first prompt forward counts what it already held (a prefix filled
            # before the press); later chunks add their own tokens.
            new_tokens = row if state.lengths is None else row[:, -query.shape[2] :]
            record = self._start_record(state, new_tokens.sum(-1).cpu(), held.key_mask, input_ids)
        lengths = torch.tensor(record.lengths, device=keys.device)
        record.kept[:, layer_idx] = lengths.unsqueeze(-1).cpu()
        budgets = torch.tensor(record.budgets, device=keys.device)
        compress_rows = lengths > budgets
        window_queries = self._window_queries(state, call)
        if held.keys.shape[2] <= self.press.window_size:
            record.skipped_layers[layer_idx] = "prompt not longer than the observation window"
        elif window_queries.shape[2] < self.press.window_size:
            record.skipped_layers[layer_idx] = (
                f"the prefill forward holds {query.shape[2]} tokens, fewer than the observation window"
            )
        elif bool(compress_rows.any()):
            start = time.perf_counter()
            visual = None
            if record.is_image is not None and record.is_video is not None:
                visual = (record.is_image | record.is_video).to(keys.device)
            _, selection = self._compress(
                call, cache, window_queries, held, budgets, compress_rows, lengths, visual
            )
            record.compressed_layers.append(layer_idx)
            record.count_kept(held.key_mask, selection, self.press.window_size, self.head_shard)
            state.seconds += time.perf_counter() - start
        else:
            record.skipped_layers[layer_idx] = "every prompt fits in its budget"

    def finish_prompt_forward(self, cache: Cache) -> None:
        """After a prompt forward's last layer: remember what the cache holds, and report it."""
        record = self._record
        self._record = None
        if record is None:
            return
        state = self.state(cache)
        state.prompt_tokens = cache.get_seq_length(self.layout.compressible_layers[0])
        for layer_idx, layer in enumerate(cache.layers):
            if isinstance(layer, CompressedLayer):
                state.held_after_compression[layer_idx] = _mean_held(layer, self.head_shard)
        self.press.last_report = record.report(cache, self.layout, state.seconds, self.head_shard)

    def on_decode(self, call: AttentionCall, cache: Cache) -> None:
        """Bounded decoding: compress a layer again once it holds ``interval`` entries per head more
        than after its last compression (and more than the decoding budget plus ``interval``)."""
        decoding = self.decoding
        layer_idx = call.layer_idx
        if decoding is None or layer_idx not in self.layout.compressible_layers:
            return
        state = self.state(cache)
        window_queries = self._window_queries(state, call)
        layer = cache.layers[layer_idx]
        held_now = (
            _mean_held(layer, self.head_shard)
            if isinstance(layer, CompressedLayer)
            else float(call.keys.shape[2])
        )
        floor = max(state.held_after_compression.get(layer_idx, 0.0), float(decoding.target))
        if (
            held_now < floor + decoding.interval
            or window_queries.shape[2] < self.press.window_size
            or state.lengths is None
        ):
            return
        held = held_layer(layer, call)
        batch = held.keys.shape[0]
        budgets = torch.full((batch,), decoding.target, dtype=torch.long, device=held.keys.device)
        seen_real = state.lengths.to(held.keys.device) + (held.seen_tokens - state.prompt_tokens)
        compress_rows = torch.ones(batch, dtype=torch.bool, device=held.keys.device)
        new_layer, _ = self._compress(call, cache, window_queries, held, budgets, compress_rows, seen_real)
        state.held_after_compression[layer_idx] = _mean_held(new_layer, self.head_shard)
        decoding.compressions += 1

    def _window_queries(self, state: CacheState, call: AttentionCall) -> torch.Tensor:
        """The last ``window_size`` queries through this cache and layer, across forwards (their
        rotary tables go to ``state.rotary``)."""
        window, layer_idx, query, rotary = self.press.window_size, call.layer_idx, call.query, call.rotary
        previous = state.queries.get(layer_idx)
        if previous is not None and query.shape[2] < window:
            query = torch.cat([previous, query], dim=2)
            earlier = state.rotary.get(layer_idx)
            rotary = None if earlier is None or rotary is None else _cat_tables(earlier, rotary)
        recent = query[:, :, -window:]
        state.queries[layer_idx] = recent.clone()  # a view would keep the whole forward's queries alive
        state.rotary[layer_idx] = (
            None if rotary is None else (rotary[0][:, -window:].clone(), rotary[1][:, -window:].clone())
        )
        return recent

    def _compress(
        self,
        call: AttentionCall,
        cache: Cache,
        window_queries: torch.Tensor,
        held: HeldLayer,
        budgets: torch.Tensor,
        compress_rows: torch.Tensor,
        context_lengths: torch.Tensor,
        visual_mask: torch.Tensor | None = None,
    ) -> tuple[CompressedLayer, tuple[torch.Tensor, torch.Tensor]]:
        """Replace the layer by one holding the selected entries and the last ``window_size``.

        ``budgets``, ``compress_rows`` and ``context_lengths`` are per sequence ``(B,)``: the
        budget, whether to cut to it, and the real tokens seen; ``visual_mask`` ``(B, N)`` marks the
        visual placeholders of a layer holding the whole prompt (None otherwise). Returns the new layer, the selected
        prefix indices and their validity (:func:`~mixkv.functional.select_top_per_head`).
        """
        press = self.press
        layer_idx = call.layer_idx
        memo_key = (layer_idx, press.window_size, press.kernel_size, press.pooling)
        known = None if self.importance_memo is None else self.importance_memo.get(memo_key)
        ctx = ScoringContext(
            queries=window_queries,
            keys=held.keys,
            values=held.values,
            key_mask=held.key_mask,
            scaling=call.scaling,
            layer_idx=layer_idx,
            compressible_layers=self.layout.compressible_layers,
            budgets=budgets,
            kernel_size=press.kernel_size,
            pooling=press.pooling,
            context_lengths=context_lengths,
            query_rotary=self.state(cache).rotary.get(layer_idx),
            rope_inv_freq=self.rope_frequencies.get(layer_idx),
            visual_mask=visual_mask,
            head_shard=self.head_shard,
            layer_inputs=call.layer_inputs,
            reconstruction_layers=self.reconstruction_scores,
            _importance=None if known is None else known.clone(),  # a clone: a press may not spoil it
        )
        new_layer, selection = compress_layer(press, ctx, compress_rows, held.seen_tokens)
        if self.importance_memo is not None and known is None and ctx._importance is not None:
            self.importance_memo[memo_key] = ctx._importance
        cache.layers[layer_idx] = new_layer
        self.created.add(new_layer)
        return new_layer, selection

    def _start_record(
        self,
        state: CacheState,
        new_tokens: torch.Tensor,
        key_mask: torch.Tensor,
        input_ids: torch.Tensor | None,
    ) -> PrefillRecord:
        """Bookkeeping of one prompt forward; ``new_tokens`` ``(B,)`` are its real tokens."""
        ids = input_ids
        if state.lengths is None and state.prompt_ids is not None:
            ids = state.prompt_ids.to(key_mask.device)
        state.lengths = state.lengths + new_tokens if state.lengths is not None else new_tokens
        budgets = [self.press.sequence_budget(int(n)) for n in state.lengths.tolist()]
        self._record = PrefillRecord.start(state.lengths, budgets, self.layout, ids, key_mask)
        return self._record


def _cat_tables(
    earlier: tuple[torch.Tensor, torch.Tensor], later: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables of two runs of positions, one after the other (batch 1 tables broadcast)."""
    batch = max(earlier[0].shape[0], later[0].shape[0])
    return tuple(  # type: ignore[return-value]
        torch.cat([a.expand(batch, -1, -1), b.expand(batch, -1, -1)], dim=1)
        for a, b in zip(earlier, later, strict=True)
    )


def _mean_held(layer: CompressedLayer, head_shard: HeadShard | None) -> float:
    """Entries per KV head the layer holds, averaged over heads (of every tensor-parallel rank, so
    that all ranks decide alike), for its fullest sequence."""
    per_sequence = layer.held_counts().float().mean(-1)
    if head_shard is not None:
        per_sequence = head_shard.sum(per_sequence) / head_shard.size
    return float(per_sequence.max())
