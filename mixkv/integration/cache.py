"""Cache layers that physically hold only the kept entries, and ``kv_cache_bytes``.

After prefill a press replaces a ``DynamicLayer`` of the model's own ``Cache`` object with one of:

* :class:`DenseCompressedLayer` - every sequence and KV head keeps the same number of entries
  (SnapKV, PyramidKV, KeyDiff, ... on an unpadded batch): a plain ``(B, Hkv, L, D)`` tensor.
* :class:`PackedCompressedLayer` - counts differ between heads or sequences (AdaKV, SparseMM,
  MixKV on them, padded batches): the selected prompt entries packed without padding plus a dense
  tail (observation window + decoded tokens).

Both report ``get_seq_length()`` as the number of tokens *seen* (not kept), so position ids of
new tokens stay those of the uncompressed sequence, and both must be attended through
:meth:`attend` (the mixkv attention function does this while a press is active).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from mixkv.functional.attention import (
    causal_tail_visibility,
    length_groups,
    packed_attention,
    padded_segment_index,
    plan_packed,
    shared_true,
)

_DETACHED_MESSAGE = (
    "this cache layer was compressed by a mixkv press and can only be used while the press is active: "
    "keep decoding inside `with press(model): ...`"
)


class CompressedLayer(CacheLayerMixin):
    """Common bookkeeping of compressed layers."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, seen_tokens: int) -> None:
        super().__init__()
        self.seen_tokens = seen_tokens
        self.active = True
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a compressed layer is created already initialised")

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        # Sizes of the uncompressed cache: the mask the model builds is the one the full cache would
        # use; compressed layers ignore it and mask by their own bookkeeping in `attend`.
        # transformers < 5.5 passes the cache positions of the queries instead of their number.
        query_length = query.shape[0] if isinstance(query, torch.Tensor) else query
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        """Name of ``get_max_length`` before transformers 5.5."""
        return self.get_max_length()

    def _check_active(self) -> None:
        if not self.active:
            raise RuntimeError(_DETACHED_MESSAGE)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new tokens to every head (to the dense part; a packed prompt part never grows)."""
        self._check_active()
        keys, values = self.dense()
        self.keys = torch.cat([keys, key_states], dim=-2)
        self.values = torch.cat([values, value_states], dim=-2)
        self.seen_tokens += key_states.shape[-2]
        return self.keys, self.values

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense ``(B, Hkv, L, D)`` keys and values (the whole layer, or the tail of a packed one)."""
        if self.keys is None or self.values is None:
            raise RuntimeError("compressed layer holds no tensors")
        return self.keys, self.values

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of ``query`` ``(B, H, q, D)`` (the newest ``q`` tokens, already appended by
        ``update``) over the layer; returns ``(B, q, H, D)`` like transformers' attention functions."""
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds (for byte accounting)."""
        raise NotImplementedError

    def held_counts(self) -> torch.Tensor:
        """Real entries each sequence and KV head holds, ``(B, Hkv)``."""
        raise NotImplementedError

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every held entry, to be scored and compressed again (chunked prefill, bounded decoding).

        Returns ``(B, Hkv, N, D)`` keys and values, oldest first, the newest tokens last, and the
        real-entry mask: ``(B, N)`` when every head holds the same entries' count, else
        ``(B, Hkv, N)`` with each head padded on the left.
        """
        raise NotImplementedError


class DenseCompressedLayer(CompressedLayer):
    """Kept entries of all heads in one ``(B, Hkv, L, D)`` tensor (equal counts everywhere)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, seen_tokens: int) -> None:
        super().__init__(seen_tokens)
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        self._check_active()
        keys, values = self.dense()
        q_len, kv_len = query.shape[2], keys.shape[2]
        mask = None if q_len == 1 else causal_tail_visibility(kv_len, q_len, query.device)
        out = F.scaled_dot_product_attention(
            query,
            keys,
            values,
            attn_mask=mask,
            scale=scaling,
            enable_gqa=query.shape[1] != keys.shape[1],
        )
        return out.transpose(1, 2).contiguous()

    def tensors(self) -> list[torch.Tensor]:
        keys, values = self.dense()
        return [keys, values]

    def held_counts(self) -> torch.Tensor:
        keys, _ = self.dense()
        return torch.full(keys.shape[:2], keys.shape[2], dtype=torch.long)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys, values = self.dense()
        return keys, values, torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool, device=keys.device)


class PackedCompressedLayer(CompressedLayer):
    """Head-wise budgets without padding: packed prompt entries + a dense tail.

    Parameters
    ----------
    packed_keys, packed_values : Tensor ``(T, D)``
        Selected prompt entries (observation window excluded), grouped by segment
        (segment = ``batch * kv_heads + kv_head``), in segment order.
    segment_lengths : LongTensor ``(B * Hkv,)``
        Packed entries of each segment. Per-entry segment ids are derived at attention time, so the
        only bookkeeping stored is one integer per head.
    tail_keys, tail_values : Tensor ``(B, Hkv, W, D)``
        The observation window; decoded tokens are appended here.
    tail_valid : BoolTensor ``(B, W)``
        False for window slots that are padding (sequences shorter than the window).
    seen_tokens : int
    """

    def __init__(
        self,
        packed_keys: torch.Tensor,
        packed_values: torch.Tensor,
        segment_lengths: torch.Tensor,
        tail_keys: torch.Tensor,
        tail_values: torch.Tensor,
        tail_valid: torch.Tensor,
        seen_tokens: int,
    ) -> None:
        super().__init__(seen_tokens)
        self.packed_keys, self.packed_values = packed_keys, packed_values
        self.segment_lengths = segment_lengths
        # A Python int, fixed at creation (the packed part never grows): no device sync per step.
        self.max_segment_length = int(segment_lengths.max()) if segment_lengths.numel() else 0
        # Same for the segments' grouping by length (see packed_attention), and for what each
        # group's attention needs: views of the packed tensors and host ints, no storage of its own.
        self.length_groups = length_groups(segment_lengths)
        self.packed_plan = plan_packed(packed_keys, packed_values, segment_lengths, self.length_groups)
        # `keys`/`values` are the dense tail so generic code that inspects shapes keeps working.
        self.keys, self.values = tail_keys, tail_values
        self.tail_valid = tail_valid
        # Decoded tokens are never padding, so this is decided once, here.
        self.tail_has_padding = not bool(tail_valid.all())
        self.dtype, self.device = tail_keys.dtype, tail_keys.device

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # New tokens are real: a view of a shared True, so growing the flags is one cat.
        real = shared_true(self.tail_valid.device).expand(self.tail_valid.shape[0], key_states.shape[-2])
        self.tail_valid = torch.cat([self.tail_valid, real], -1)
        return super().update(key_states, value_states)

    def mark_padding(self, new_valid: torch.Tensor) -> None:
        """Record which of the newest ``q`` tail entries are real, ``new_valid`` ``(B, q)``: a chunk
        of a left-padded prompt may still hold padding (decoded tokens never do)."""
        self.tail_valid[:, -new_valid.shape[1] :] = new_valid.to(self.tail_valid.device)
        self.tail_has_padding = not bool(self.tail_valid.all())

    def held_counts(self) -> torch.Tensor:
        keys, _ = self.dense()
        packed = self.segment_lengths.view(keys.shape[0], keys.shape[1])
        return (packed + self.tail_valid.sum(-1, keepdim=True).to(packed.device)).cpu()

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys, values = self.dense()
        batch, kv_heads, _, head_dim = keys.shape
        segments, longest = batch * kv_heads, self.max_segment_length
        index, valid = padded_segment_index(self.segment_lengths, longest)
        # Rotate each segment's row right so its entries end where the tail begins (left padding).
        shift = (torch.arange(longest, device=index.device) + self.segment_lengths[:, None]) % max(longest, 1)
        index = index.view(segments, longest).gather(1, shift).flatten()
        valid = valid.gather(1, shift).view(batch, kv_heads, longest)

        def padded(packed: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
            prefix = packed.index_select(0, index).view(batch, kv_heads, longest, head_dim)
            return torch.cat([prefix, tail], dim=2)

        mask = torch.cat([valid, self.tail_valid[:, None, :].expand(-1, kv_heads, -1)], dim=2)
        return padded(self.packed_keys, keys), padded(self.packed_values, values), mask

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        self._check_active()
        keys, values = self.dense()
        batch, num_heads, q_len, head_dim = query.shape
        kv_heads, tail_len = keys.shape[1], keys.shape[2]
        group = num_heads // kv_heads
        segments = batch * kv_heads
        # (B, H, q, D) -> (S, group * q, D): query head h*group + j belongs to KV head h.
        grouped = query.reshape(segments, group * q_len, head_dim)
        visible = None  # a single new token over an unpadded tail sees everything: skip the mask
        if q_len > 1 or self.tail_has_padding:
            causal = causal_tail_visibility(tail_len, q_len, query.device)  # (q, T)
            padding = self.tail_valid.repeat_interleave(kv_heads, 0)[:, None]
            # A padding query (a chunk of a left-padded prompt) sees every entry: its output is
            # never used, and a row that sees nothing would be NaN.
            padded_query = ~self.tail_valid[:, -q_len:].repeat_interleave(kv_heads, 0).repeat(1, group)
            visible = (causal.repeat(group, 1).unsqueeze(0) & padding) | padded_query[..., None]
        out = packed_attention(
            grouped,
            self.packed_keys,
            self.packed_values,
            self.segment_lengths,
            self.packed_plan,
            keys.reshape(segments, tail_len, head_dim),
            values.reshape(segments, tail_len, head_dim),
            visible,
            scaling,
        )
        return out.reshape(batch, num_heads, q_len, head_dim).transpose(1, 2).contiguous()

    def tensors(self) -> list[torch.Tensor]:
        keys, values = self.dense()
        return [
            self.packed_keys,
            self.packed_values,
            self.segment_lengths,
            keys,
            values,
            self.tail_valid,
        ]

    def select_rows(self, rows: list[int]) -> PackedCompressedLayer:
        """A new layer holding only the given batch rows, in that order (e.g. the answers still
        being decoded when the others have ended); this layer is unchanged."""
        keys, values = self.dense()
        kv_heads = keys.shape[1]
        device = self.segment_lengths.device
        row_index = torch.tensor(rows, dtype=torch.long, device=device)
        segments = (row_index[:, None] * kv_heads + torch.arange(kv_heads, device=device)).flatten()
        index, valid = padded_segment_index(self.segment_lengths, self.max_segment_length)
        index = index.view(-1, self.max_segment_length)[segments][valid[segments]]
        tail_rows = row_index.to(keys.device)
        layer = PackedCompressedLayer(
            self.packed_keys.index_select(0, index.to(self.packed_keys.device)),
            self.packed_values.index_select(0, index.to(self.packed_values.device)),
            self.segment_lengths[segments],
            keys[tail_rows],
            values[tail_rows],
            self.tail_valid[tail_rows.to(self.tail_valid.device)],
            self.seen_tokens,
        )
        layer.active = self.active
        return layer

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError(
            "beam search is not supported on a head-wise (packed) compressed cache; use greedy or sampling, "
            "or a uniform press such as SnapKVPress"
        )


def _layer_tensors(layer: object) -> list[torch.Tensor]:
    if isinstance(layer, CompressedLayer):
        return layer.tensors()
    found = []
    for name in ("keys", "values"):
        value = getattr(layer, name, None)
        if isinstance(value, torch.Tensor):
            found.append(value)
    return found


def _storage_bytes(layers: list[object]) -> int:
    # Each underlying storage counts once, at its full size: a small view into a large tensor
    # keeps the large tensor alive, so that is what it costs.
    seen: set[tuple[str, int]] = set()
    total = 0
    for layer in layers:
        for tensor in _layer_tensors(layer):
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if key in seen or storage.nbytes() == 0:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def layer_bytes(layer: object) -> int:
    """Bytes of tensor storage one cache layer holds."""
    return _storage_bytes([layer])


def token_bytes(layer: Any) -> int:
    """Bytes one more token adds to a cache layer of one sequence: its key and value in every KV
    head, plus a packed layer's one-byte validity flag."""
    keys = layer.keys
    flag = 1 if isinstance(layer, PackedCompressedLayer) else 0
    return 2 * keys.shape[1] * keys.shape[3] * keys.element_size() + flag


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes of tensor storage the cache holds (keys, values and mixkv's bookkeeping).

    Each storage is counted once at its full size, so a cache that only *views* a slice of a large
    tensor is charged for the large tensor.
    """
    if not isinstance(cache, Cache):
        raise TypeError(f"kv_cache_bytes expects a transformers Cache, got {type(cache).__name__}")
    return _storage_bytes(list(cache.layers))


def stack_layers(layers: list[Any], seen_tokens: int, *, shortened: bool = False) -> PackedCompressedLayer:
    """One layer whose batch rows are the given single-sequence layers, e.g. the same prompt
    compressed by several presses, so that their answers can be decoded as one batch.

    Each input is a :class:`CompressedLayer` or a plain full-attention ``DynamicLayer`` (a layer
    left uncompressed), batch size 1, all with the same KV heads, head size and ``seen_tokens``
    (the same prompt). With ``shortened``, a plain layer may hold fewer entries than
    ``seen_tokens``: those a press kept by cutting the layer in place (kvpress's presses do). Every held entry becomes a packed entry of its row and head; the dense
    tail starts empty and receives the decoded tokens. Attention over a row equals attention
    over the layer it came from: entries are attended as a set and carry their positions in
    their rotary embeddings.

    Raises
    ------
    ValueError
        A layer of another kind (sliding-window layers evict as they grow), a batch larger than 1,
        or rows that differ in shape, dtype or tokens seen.
    """
    from transformers.cache_utils import DynamicLayer

    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    lengths: list[int] = []
    shapes = set()
    for layer in layers:
        if isinstance(layer, CompressedLayer):
            layer_keys, layer_values, valid = layer.entries()
            seen = layer.seen_tokens
        elif (
            type(layer) is DynamicLayer
            and isinstance(layer.keys, torch.Tensor)
            and isinstance(layer.values, torch.Tensor)
        ):
            layer_keys, layer_values = layer.keys, layer.values
            valid = torch.ones(
                layer_keys.shape[0], layer_keys.shape[2], dtype=torch.bool, device=layer_keys.device
            )
            seen = seen_tokens if shortened and layer_keys.shape[2] <= seen_tokens else layer_keys.shape[2]
        else:
            raise ValueError(
                f"cannot stack a {type(layer).__name__} (only mixkv's compressed layers and full-attention "
                "DynamicLayers): decode these caches one at a time"
            )
        if layer_keys.shape[0] != 1 or seen != seen_tokens:
            raise ValueError(
                f"stacked layers must each hold one sequence of {seen_tokens} tokens seen; got batch "
                f"{layer_keys.shape[0]} with {seen} seen"
            )
        shapes.add((layer_keys.shape[1], layer_keys.shape[3], layer_keys.dtype, layer_keys.device))
        kv_heads = layer_keys.shape[1]
        per_head = valid if valid.dim() == 3 else valid[:, None, :].expand(-1, kv_heads, -1)
        for head in range(kv_heads):
            kept = per_head[0, head]
            keys.append(layer_keys[0, head][kept])
            values.append(layer_values[0, head][kept])
            lengths.append(int(kept.sum()))
    if len(shapes) != 1:
        raise ValueError(f"stacked layers must share KV heads, head size, dtype and device; got {shapes}")
    kv_heads, head_dim, dtype, device = shapes.pop()
    tail = torch.zeros(len(layers), kv_heads, 0, head_dim, dtype=dtype, device=device)
    return PackedCompressedLayer(
        torch.cat(keys),
        torch.cat(values),
        torch.tensor(lengths, dtype=torch.long, device=device),
        tail,
        tail.clone(),
        torch.zeros(len(layers), 0, dtype=torch.bool, device=device),
        seen_tokens,
    )
