"""Attaching a press to a model for the duration of a ``with`` block.

How it works, using only transformers' extension points:

1. An attention function is registered in transformers' ``AttentionInterface`` (and the matching
   mask function in ``AttentionMaskInterface``) under ``mixkv_sdpa`` / ``mixkv_eager``, and the text
   decoder's config is pointed at it. The function receives the model's own post-rotary queries,
   so scoring is right for every rotary variant (Qwen-VL's multi-axis M-RoPE included) without
   re-implementing it.
2. A forward pre-hook on each decoder attention module records the ``Cache`` object in use.
3. At the end of prefill (the first multi-token forward through a given ``Cache`` while the press
   is active) the function computes each layer's output over the full prompt, then scores the
   prompt and replaces the layer in the model's own cache by a compressed layer that holds only the
   kept entries. The cache may already hold a prefix filled before the ``with`` block (a cached
   system prompt, a shared document); the whole content is then scored with the queries of the
   forward's last ``window_size`` tokens, exactly as if it had been prefilled in one go.
4. Afterwards, attention over compressed layers is computed by the layers themselves.

On exit (also on exceptions) hooks are removed, the config is restored, the registrations are
dropped when no press remains, and compressed layers refuse further use.
"""

from __future__ import annotations

import copy
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from mixkv.functional import select_top_per_head
from mixkv.integration.cache import (
    CompressedLayer,
    DenseCompressedLayer,
    PackedCompressedLayer,
    kv_cache_bytes,
    layer_bytes,
)
from mixkv.integration.models import DecoderLayout, describe_decoder
from mixkv.integration.report import CompressionReport
from mixkv.presses.base import ScoringContext

if TYPE_CHECKING:
    from mixkv.presses.base import BasePress

_FUNCTION_NAMES = {"sdpa": "mixkv_sdpa", "eager": "mixkv_eager"}


@dataclass
class _Binding:
    session: PressSession
    layer_idx: int
    original: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


# id(attention module) -> binding, only while a press is active on that module.
_BINDINGS: dict[int, _Binding] = {}
_active_sessions = 0


def _mixkv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    binding = _BINDINGS.get(id(module))
    if binding is None:
        raise RuntimeError(
            f"{type(module).__name__} is configured for mixkv attention but no press is attached to it; "
            "use the model inside `with press(model): ...` only"
        )
    return binding.session.attention(binding, module, query, key, value, attention_mask, **kwargs)


def _register_functions() -> None:
    global _active_sessions
    if _active_sessions == 0:
        for original, name in _FUNCTION_NAMES.items():
            AttentionInterface.register(name, _mixkv_attention)
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    _active_sessions += 1


def _unregister_functions() -> None:
    global _active_sessions
    _active_sessions -= 1
    if _active_sessions == 0:
        for name in _FUNCTION_NAMES.values():
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)


def _original_attention(module: torch.nn.Module, implementation: str) -> Callable[..., Any]:
    if implementation == "eager":
        # Eager attention is model-specific (softcapping, sinks...): use the one beside the module's class.
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise ValueError(
                f"{type(module).__name__} has no eager attention function; load the model with 'sdpa'"
            )
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


def key_mask_from_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """Real-token mask ``(B, N)`` of the prompt, read off the model's prefill attention mask.

    The last prompt token may attend to every real token, so the last query row of a 4-D mask (bool
    for sdpa, additive float for eager) is exactly the padding mask.
    """
    if attention_mask is None:
        return torch.ones((batch, length), dtype=torch.bool, device=device)
    if attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, :]
    elif attention_mask.dim() == 2:
        row = attention_mask
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(attention_mask.shape)}")
    if row.shape[-1] != length:
        raise ValueError(f"attention mask covers {row.shape[-1]} keys but the cache holds {length}")
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2 if row.is_floating_point() else row != 0
    return row.to(device).expand(batch, length)


@dataclass
class _PrefillRecord:
    """Bookkeeping of one compressed prefill, turned into a CompressionReport at its last layer."""

    lengths: list[int]
    budgets: list[int]
    kept: torch.Tensor
    compressed_layers: list[int] = field(default_factory=list)
    skipped_layers: dict[int, str] = field(default_factory=dict)
    full_bytes_of_compressed: int = 0
    seconds: float = 0.0
    # Visual placeholders of the prompt, ``(B, N)`` each (None for text-only models or embeddings).
    is_image: torch.Tensor | None = None
    is_video: torch.Tensor | None = None
    # Kept image / video entries per sequence, summed over compressed layers (KV-head mean).
    image_kept: torch.Tensor | None = None
    video_kept: torch.Tensor | None = None


class PressSession:
    """A press applied to one model; use as a context manager (``with press(model): ...``)."""

    def __init__(self, press: BasePress, model: torch.nn.Module) -> None:
        self.press = press
        self.model = model
        self.layout: DecoderLayout = describe_decoder(model)
        press.check_model(self.layout.num_layers, self.layout.num_heads, self.layout.num_kv_heads)
        self._handles: list[RemovableHandle] = []
        self._bound: list[int] = []
        self._saved_implementation: str | None = None
        self._caches: dict[int, Cache | None] = {}
        # Layers this session made (compressions and forks): detached on exit. Weak, so that forks
        # dropped by their user are freed before the session ends.
        self._created: weakref.WeakSet[CompressedLayer] = weakref.WeakSet()
        self._input_ids: torch.Tensor | None = None
        self._record: _PrefillRecord | None = None
        # Caches whose prefill this session has handled: later forwards through them only append.
        self._prefilled: weakref.WeakSet[Cache] = weakref.WeakSet()
        self._entered = False

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> PressSession:
        if self._entered:
            raise RuntimeError("this press session is already active")
        modules = self.layout.attention_modules
        if any(id(m) in _BINDINGS for m in modules):
            raise ValueError(
                "another mixkv press is already attached to this model; nesting presses is not supported"
            )
        self._entered = True
        _register_functions()
        try:
            implementation = self.layout.text_config._attn_implementation
            for layer_idx, module in enumerate(modules):
                _BINDINGS[id(module)] = _Binding(self, layer_idx, _original_attention(module, implementation))
                self._bound.append(id(module))
                self._handles.append(
                    module.register_forward_pre_hook(self._capture_cache(layer_idx), with_kwargs=True)
                )
            self._handles.append(self.model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True))
            self._saved_implementation = implementation
            # Set the internal attribute: the public setter would also switch the vision tower.
            self.layout.text_config._attn_implementation_internal = _FUNCTION_NAMES[implementation]
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for key in self._bound:
            _BINDINGS.pop(key, None)
        self._bound.clear()
        if self._saved_implementation is not None:
            self.layout.text_config._attn_implementation_internal = self._saved_implementation
            self._saved_implementation = None
        for layer in list(self._created):
            layer.active = False
        self._created.clear()
        self._caches.clear()
        self._input_ids = None
        self._record = None
        self._prefilled.clear()
        if self._entered:
            self._entered = False
            _unregister_functions()

    def fork(self, cache: Cache) -> Cache:
        """An independent copy of a cache this session has prefilled (and compressed).

        Forwards through the copy append to it as they would to the original (it is not compressed
        again); its compressed layers detach when the session ends, like the original's. Use one
        fork per question to ask several questions about one compressed context.

        Raises
        ------
        ValueError
            If this session has not prefilled ``cache``.
        """
        if not self._entered or cache not in self._prefilled:
            raise ValueError(
                "fork() copies a cache this press session has prefilled: run the context through the "
                "model inside `with press(model) as session:` first"
            )
        copied = copy.deepcopy(cache)
        self._prefilled.add(copied)
        for layer in copied.layers:
            if isinstance(layer, CompressedLayer):
                self._created.add(layer)
        return copied

    # -- hooks ----------------------------------------------------------------------------------
    def _capture_cache(self, layer_idx: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            # The argument is `past_key_values` up to transformers 5.23 and `cache` from 5.24 on.
            found = (value for value in (*args, *kwargs.values()) if isinstance(value, Cache))
            self._caches[layer_idx] = next(found, None)

        return hook

    def _capture_inputs(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids = args[0]
        self._input_ids = input_ids if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else None

    # -- attention --------------------------------------------------------------------------------
    def attention(
        self,
        binding: _Binding,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer_idx = binding.layer_idx
        cache = self._caches.get(layer_idx)
        layer = cache.layers[layer_idx] if cache is not None and layer_idx < len(cache.layers) else None
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        if isinstance(layer, CompressedLayer):
            if kwargs.get("softcap") is not None:
                raise ValueError("attention logit softcapping is not supported on a compressed cache")
            return layer.attend(query, float(scaling)), None
        output = binding.original(module, query, key, value, attention_mask, **kwargs)
        if (
            cache is not None
            and isinstance(layer, CacheLayerMixin)
            and query.shape[2] > 1
            and cache not in self._prefilled
        ):
            self._on_prefill(layer_idx, cache, layer, query, key, value, attention_mask, float(scaling))
        return output

    def _on_prefill(
        self,
        layer_idx: int,
        cache: Cache,
        layer: Any,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> None:
        if layer_idx in self.layout.compressible_layers:
            # Sliding-window layers are skipped before their mask is read: it hides more than padding.
            length = keys.shape[2]
            key_mask = key_mask_from_attention_mask(attention_mask, keys.shape[0], length, keys.device)
            lengths = key_mask.sum(-1)
            record = self._record
            if layer_idx == self.layout.compressible_layers[0] or record is None:
                record = self._start_record(lengths, key_mask)
            record.kept[:, layer_idx] = lengths.unsqueeze(-1).cpu()
            if type(layer) is not DynamicLayer:
                raise ValueError(
                    f"mixkv compresses DynamicCache layers; layer {layer_idx} is a {type(layer).__name__} "
                    "(use the default dynamic cache, not a static or quantized one)"
                )
            budgets = torch.tensor(record.budgets, device=keys.device)
            compress_rows = lengths > budgets
            if length <= self.press.window_size:
                record.skipped_layers[layer_idx] = "prompt not longer than the observation window"
            elif query.shape[2] < self.press.window_size:
                record.skipped_layers[layer_idx] = (
                    f"the prefill forward holds {query.shape[2]} tokens, fewer than the observation window"
                )
            elif bool(compress_rows.any()):
                start = time.perf_counter()
                self._compress(
                    record, layer_idx, cache, query, keys, values, key_mask, budgets, compress_rows, scaling
                )
                record.seconds += time.perf_counter() - start
            else:
                record.skipped_layers[layer_idx] = "every prompt fits in its budget"
        if layer_idx == self.layout.num_layers - 1:
            self._prefilled.add(cache)
            self._finish_record(cache)

    def _start_record(self, lengths: torch.Tensor, key_mask: torch.Tensor) -> _PrefillRecord:
        batch = lengths.shape[0]
        budgets = [self.press.sequence_budget(int(n)) for n in lengths.tolist()]
        record = _PrefillRecord(
            lengths=[int(n) for n in lengths.tolist()],
            budgets=budgets,
            kept=torch.zeros((batch, self.layout.num_layers, self.layout.num_kv_heads), dtype=torch.long),
        )
        ids = self._input_ids
        masks = (
            self.layout.visual_token_masks(ids) if ids is not None and ids.shape == key_mask.shape else None
        )
        if ids is not None and masks is not None:
            real = key_mask.to(ids.device)
            record.is_image, record.is_video = (mask & real for mask in masks)
            record.image_kept = torch.zeros(batch)
            record.video_kept = torch.zeros(batch)
        self._record = record
        return record

    def _compress(
        self,
        record: _PrefillRecord,
        layer_idx: int,
        cache: Cache,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_mask: torch.Tensor,
        budgets: torch.Tensor,
        compress_rows: torch.Tensor,
        scaling: float,
    ) -> None:
        press = self.press
        window = press.window_size
        _, _, length, head_dim = keys.shape
        prefix = length - window
        lengths = key_mask.sum(-1)
        ctx = ScoringContext(
            queries=query[:, :, -window:],
            keys=keys,
            values=values,
            key_mask=key_mask,
            scaling=scaling,
            layer_idx=layer_idx,
            compressible_layers=self.layout.compressible_layers,
            budgets=budgets,
            kernel_size=press.kernel_size,
            pooling=press.pooling,
        )
        prefix_mask = key_mask[:, :prefix]
        window_valid = key_mask[:, prefix:]
        counts = torch.where(
            compress_rows.unsqueeze(-1), press.head_budgets(ctx).to(keys.device), lengths[:, None]
        )
        available = prefix_mask.sum(-1, keepdim=True)
        prefix_counts = torch.minimum((counts - window_valid.sum(-1, keepdim=True)).clamp(min=0), available)
        scores = press.scores(ctx).float()
        # Sequences within their budget keep every real prompt token.
        scores = torch.where(compress_rows[:, None, None], scores, torch.zeros_like(scores))
        scores = scores.masked_fill(~prefix_mask[:, None, :], float("-inf"))
        indices, valid = select_top_per_head(scores, prefix_counts)
        gather_index = indices.unsqueeze(-1).expand(-1, -1, -1, head_dim)
        kept_keys = keys[:, :, :prefix].gather(2, gather_index)
        kept_values = values[:, :, :prefix].gather(2, gather_index)
        full_bytes = layer_bytes(cache.layers[layer_idx])
        new_layer: CompressedLayer
        if bool((prefix_counts == prefix_counts.flatten()[0]).all()) and bool(window_valid.all()):
            new_layer = DenseCompressedLayer(
                torch.cat([kept_keys, keys[:, :, prefix:]], dim=2),
                torch.cat([kept_values, values[:, :, prefix:]], dim=2),
                seen_tokens=length,
            )
        else:
            new_layer = PackedCompressedLayer(
                kept_keys[valid],
                kept_values[valid],
                prefix_counts.flatten().long(),
                keys[:, :, prefix:].clone(),
                values[:, :, prefix:].clone(),
                window_valid.clone(),
                seen_tokens=length,
            )
        cache.layers[layer_idx] = new_layer
        self._created.add(new_layer)
        kept = prefix_counts + window_valid.sum(-1, keepdim=True)
        record.kept[:, layer_idx] = kept.cpu()
        record.compressed_layers.append(layer_idx)
        record.full_bytes_of_compressed += full_bytes
        if record.image_kept is not None and record.video_kept is not None:
            record.image_kept += _kept_of(record.is_image, indices, valid, prefix, window_valid)
            record.video_kept += _kept_of(record.is_video, indices, valid, prefix, window_valid)

    def _finish_record(self, cache: Cache) -> None:
        record = self._record
        self._record = None
        if record is None:
            return
        lengths = torch.tensor(record.lengths)
        for layer_idx in range(self.layout.num_layers):
            if layer_idx not in self.layout.compressible_layers:
                held = getattr(cache.layers[layer_idx], "keys", None)
                window = held.shape[-2] if isinstance(held, torch.Tensor) else 0
                record.kept[:, layer_idx] = lengths.clamp(max=window).unsqueeze(-1)
                record.skipped_layers[layer_idx] = (
                    "sliding-window layer (its cache is already bounded by the window)"
                )
        compressed_bytes = kv_cache_bytes(cache)
        compressed_now = sum(layer_bytes(cache.layers[i]) for i in record.compressed_layers)
        counts: dict[str, list[Any]] = {}
        if (
            record.is_image is not None
            and record.is_video is not None
            and record.image_kept is not None
            and record.video_kept is not None
        ):
            image_total = record.is_image.sum(-1).cpu()
            video_total = record.is_video.sum(-1).cpu()
            if record.compressed_layers:  # means over compressed layers (and KV heads)
                layers = len(record.compressed_layers)
                image_kept, video_kept = record.image_kept / layers, record.video_kept / layers
                all_kept = record.kept[:, record.compressed_layers].float().mean((1, 2))
            else:  # nothing compressed: every token is kept
                image_kept, video_kept = image_total.float(), video_total.float()
                all_kept = lengths.float()
            counts = {
                "image_tokens_total": image_total.tolist(),
                "video_tokens_total": video_total.tolist(),
                "text_tokens_total": (lengths - image_total - video_total).tolist(),
                "image_tokens_kept": image_kept.tolist(),
                "video_tokens_kept": video_kept.tolist(),
                "text_tokens_kept": (all_kept - image_kept - video_kept).tolist(),
            }
        self.press.last_report = CompressionReport(
            context_lengths=record.lengths,
            budgets=record.budgets,
            kept_tokens=record.kept,
            compressed_layers=record.compressed_layers,
            skipped_layers=record.skipped_layers,
            full_bytes=compressed_bytes - compressed_now + record.full_bytes_of_compressed,
            compressed_bytes=compressed_bytes,
            compression_seconds=record.seconds,
            **counts,
        )


def _kept_of(
    is_kind: torch.Tensor | None,
    indices: torch.Tensor,
    valid: torch.Tensor,
    prefix: int,
    window_valid: torch.Tensor,
) -> torch.Tensor:
    """Kept entries of one kind (e.g. video tokens) per sequence, averaged over KV heads.

    ``indices``/``valid`` ``(B, H, K)`` are the kept prefix positions; the window is always kept.
    """
    if is_kind is None:
        return torch.zeros(indices.shape[0])
    is_kind = is_kind.to(indices.device)
    batch = indices.shape[0]
    in_prefix = is_kind[:, :prefix].gather(1, indices.reshape(batch, -1)).view_as(valid) & valid
    in_window = (is_kind[:, prefix:] & window_valid).sum(-1, keepdim=True)
    return (in_prefix.sum(-1) + in_window).float().mean(-1).cpu()
