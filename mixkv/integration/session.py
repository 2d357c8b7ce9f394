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
   A prompt may also arrive in chunks: the forwards of ``generate(..., prefill_chunk_size=N)``
   (recognised from ``generate``'s own chunk loop) or those inside ``session.chunked_prefill()``.
   Each chunk is compressed at the end of its forward, scored over everything the layer holds with
   the queries of the last ``window_size`` tokens so far, so a layer never holds more than about
   budget + chunk entries per KV head.
4. Afterwards, attention over compressed layers is computed by the layers themselves; under a
   :class:`~mixkv.DecodingPress` a layer is compressed again every ``interval`` generated tokens.

On exit (also on exceptions) hooks are removed, the config is restored, the registrations are
dropped when no press remains, and compressed layers refuse further use.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer
from transformers.generation.utils import GenerationMixin
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
from mixkv.integration.decoder_layout import DecoderLayout, describe_decoder
from mixkv.presses.base import ScoringContext
from mixkv.presses.compression_report import CompressionReport

if TYPE_CHECKING:
    from mixkv.presses.base import BasePress
    from mixkv.presses.decoding import DecodingPress

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
    """Bookkeeping of one prompt forward, turned into a CompressionReport at its last layer."""

    lengths: list[int]
    budgets: list[int]
    kept: torch.Tensor
    compressed_layers: list[int] = field(default_factory=list)
    skipped_layers: dict[int, str] = field(default_factory=dict)
    # Visual placeholders of the prompt, ``(B, N)`` each (None for text-only models, embeddings or
    # chunked prompts).
    is_image: torch.Tensor | None = None
    is_video: torch.Tensor | None = None
    # Kept image / video entries per sequence, summed over compressed layers (KV-head mean).
    image_kept: torch.Tensor | None = None
    video_kept: torch.Tensor | None = None
    # Per prompt position ``(B, N)``: the KV-head fraction keeping it, summed over compressed layers.
    position_kept: torch.Tensor | None = None


@dataclass
class _CacheState:
    """What the session remembers about one cache between forwards."""

    lengths: torch.Tensor | None = None  # real prompt tokens seen so far (B,)
    prompt_tokens: int = 0  # positions the prompt covers (padding included)
    seconds: float = 0.0  # time spent compressing the prompt
    # layer -> queries of the last `window_size` tokens (a chunk may be shorter than the window)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    # layer -> entries per KV head right after its last compression (bounded decoding)
    held_after_compression: dict[int, float] = field(default_factory=dict)
    # ids of the whole prompt its first prompt forward completes (``declare_prompt``)
    prompt_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class _Chunk:
    """The current forward is one chunk of a prompt; ``closes_prompt`` when it is the last."""

    closes_prompt: bool


@dataclass(frozen=True)
class _PromptCall:
    """What one layer's attention gave the press in a recorded prompt forward."""

    layer_idx: int
    queries: torch.Tensor  # the forward's last `window` queries (B, H, W, D)
    query_tokens: int  # queries in the forward
    keys: torch.Tensor  # everything the layer held after the forward (B, Hkv, N, D)
    values: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float


@dataclass
class RecordedPrompt:
    """One prompt forward through a full-cache layer stack, as a press saw it (see
    :meth:`PressSession.recording_prompt`); other presses compress the same prompt from it with
    :meth:`PressSession.compress_recorded`, without a forward."""

    window: int
    calls: list[_PromptCall] = field(default_factory=list)
    input_ids: torch.Tensor | None = None
    prompt_ids: torch.Tensor | None = None
    #: SnapKV importance per (layer, window size, kernel size, pooling): it depends only on the
    #: recorded queries and keys, so the first press that computes it (recording or compressing)
    #: leaves it here and presses with the same window and pooling reuse it.
    importance: dict[tuple[int, int, int, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def full_cache(self) -> Cache:
        """A new dynamic cache holding every key and value of the recorded prompt: the full cache
        the recorded forward would have left without a press."""
        cache = DynamicCache()
        for call in self.calls:
            cache.update(call.keys, call.values, call.layer_idx)
        return cache


def _generate_prefill_chunk() -> _Chunk | None:
    """The chunk ``generate(..., prefill_chunk_size=N)`` is prefilling, read off its frame.

    transformers passes nothing to the model that tells a chunk of a prompt from a later question,
    so the press looks at the caller: ``GenerationMixin._prefill``'s loop over ``input_chunks``.
    """
    prefill_code = getattr(getattr(GenerationMixin, "_prefill", None), "__code__", None)
    frame: FrameType | None = sys._getframe(1)
    for _ in range(_GENERATE_FRAME_DEPTH):
        if frame is None:
            return None
        if frame.f_code is prefill_code:
            chunks, index = frame.f_locals.get("input_chunks"), frame.f_locals.get("chunk_idx")
            if not isinstance(chunks, (tuple, list)) or not isinstance(index, int) or len(chunks) < 2:
                return None
            return _Chunk(closes_prompt=index == len(chunks) - 1)
        frame = frame.f_back
    return None


_GENERATE_FRAME_DEPTH = 8


class PressSession:
    """A press applied to one model; use as a context manager (``with press(model): ...``)."""

    def __init__(
        self, press: BasePress, model: torch.nn.Module, decoding: DecodingPress | None = None
    ) -> None:
        self.press = press
        self.decoding = decoding
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
        # Caches whose prompt this session has handled: later forwards through them only append
        # (or, under a DecodingPress, are compressed every `interval` tokens).
        self._prefilled: weakref.WeakSet[Cache] = weakref.WeakSet()
        # Caches whose prompt is arriving in chunks inside `chunked_prefill()`.
        self._open: weakref.WeakSet[Cache] = weakref.WeakSet()
        self._states: weakref.WeakKeyDictionary[Cache, _CacheState] = weakref.WeakKeyDictionary()
        self._chunk: _Chunk | None = None
        self._in_chunked_prefill = False
        self._entered = False
        self._recording: RecordedPrompt | None = None
        # Where _compress looks up and leaves window importance: the recording being made or compressed.
        self._importance_memo: dict[tuple[int, int, int, str], torch.Tensor] | None = None

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
        self._open.clear()
        self._states.clear()
        self._chunk = None
        self._in_chunked_prefill = False
        self._recording = None
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

    def adopt(self, cache: Cache) -> None:
        """Use a cache whose prompt is already in it, compressed elsewhere (e.g. the caches of
        several presses stacked into one batch with :func:`~mixkv.integration.cache.stack_layers`),
        in this session: forwards through it append to it and are not compressed again, and its
        compressed layers detach when the session ends. Not under a :class:`~mixkv.DecodingPress`
        (its re-compressions keep state from the prefill it ran)."""
        if not self._entered:
            raise ValueError(
                "adopt() needs an active session: call it inside `with press(model) as session:`"
            )
        if self.decoding is not None:
            raise ValueError(
                "adopt() is not supported under a DecodingPress; decode such caches in their own session"
            )
        self._prefilled.add(cache)
        for layer in cache.layers:
            if isinstance(layer, CompressedLayer):
                self._created.add(layer)

    def declare_prompt(self, cache: Cache, input_ids: torch.Tensor) -> None:
        """Give the ids of the whole prompt that the next forward through ``cache`` completes.

        For prompts whose last forward does not carry all their ids: a prefix prefilled into
        ``cache`` before the press (e.g. one full-cache prefix copied for several presses), or a
        rest fed as ``inputs_embeds``. Compression is the same either way (prefix and rest are
        scored together); the ids let the report count image and video tokens over the whole
        prompt, as it does for a one-go prefill.

        Raises
        ------
        ValueError
            If ``input_ids`` is not ``(B, N)`` with N more than the tokens ``cache`` holds, or the
            cache has already had a prompt forward in this session.
        """
        state = self._state(cache)
        if state.lengths is not None or cache in self._prefilled:
            raise ValueError(
                "declare_prompt must come before the cache's first prompt forward under this press"
            )
        held = cache.get_seq_length()
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] <= held:
            shape = (
                tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            )
            raise ValueError(
                f"declare_prompt needs the ids of the whole prompt, shape (batch, N) with N more than the "
                f"{held} tokens the cache holds; got {shape}"
            )
        state.prompt_ids = input_ids

    @contextlib.contextmanager
    def recording_prompt(self, window: int | None = None) -> Iterator[RecordedPrompt]:
        """Record the next prompt forward as this session's press sees it, for other presses.

        A press compresses each layer after attending over the whole prompt, so the forward itself
        (every layer's queries, keys, values and output) is the same under every press; only what
        the cache keeps differs. Inside this block one prompt forward (not chunked) runs and is
        compressed as usual, and the yielded :class:`RecordedPrompt` keeps, per layer, the last
        ``window`` queries (default: this press's ``window_size``) and every key and value the
        layer held. Another press's :meth:`compress_recorded` then compresses that prompt exactly
        as its own forward would have, at the cost of its scoring alone.
        """
        if not self._entered:
            raise RuntimeError("use recording_prompt() inside `with press(model) as session: ...`")
        recorded = RecordedPrompt(window=window if window is not None else self.press.window_size)
        self._recording, self._importance_memo = recorded, recorded.importance
        try:
            yield recorded
        finally:
            self._recording = self._importance_memo = None

    def compress_recorded(self, recorded: RecordedPrompt) -> Cache:
        """A new cache holding the recorded prompt compressed by this session's press.

        The same selection, entry for entry, as running the recorded forward under this press
        (tested against it); ``press.last_report`` describes it. The cache's layers are plain
        dynamic layers, so models with sliding-window layers are refused.

        Raises
        ------
        ValueError
            If ``recorded`` holds no complete forward, the model has sliding-window layers, or this
            press's ``window_size`` is larger than the recorded window of a longer forward.
        """
        if not self._entered:
            raise RuntimeError("use compress_recorded() inside `with press(model) as session: ...`")
        if len(self.layout.compressible_layers) != self.layout.num_layers:
            raise ValueError(
                f"{type(self.model).__name__} has sliding-window layers; replaying a recorded prompt supports "
                "models whose every layer is a full dynamic layer"
            )
        if [call.layer_idx for call in recorded.calls] != list(range(self.layout.num_layers)):
            raise ValueError(
                "recorded holds no complete prompt forward: run one forward inside recording_prompt() first"
            )
        forward_tokens = recorded.calls[0].query_tokens
        if forward_tokens > recorded.window and self.press.window_size > recorded.window:
            raise ValueError(
                f"this press's window_size ({self.press.window_size}) is larger than the {recorded.window} "
                "queries recorded; record with recording_prompt(window=...) at least as large"
            )
        cache = recorded.full_cache()
        self._input_ids = recorded.input_ids
        self._chunk = None
        state = self._state(cache)
        state.prompt_ids = recorded.prompt_ids
        self._importance_memo = recorded.importance
        try:
            for call in recorded.calls:
                layer = cache.layers[call.layer_idx]
                self._on_prefill(
                    call.layer_idx,
                    cache,
                    layer,
                    call.queries,
                    call.keys,
                    call.values,
                    call.attention_mask,
                    call.scaling,
                )
        finally:
            self._importance_memo = None
        return cache

    def _record_call(
        self,
        recorded: RecordedPrompt,
        cache: Cache,
        layer_idx: int,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> None:
        if self._chunk is not None:
            raise ValueError("recording_prompt() records a prompt run in one forward, not in chunks")
        if any(call.layer_idx == layer_idx for call in recorded.calls):
            raise ValueError("recording_prompt() records one prompt forward; start a new block for another")
        if not recorded.calls:
            recorded.input_ids = self._input_ids
            recorded.prompt_ids = self._state(cache).prompt_ids
        recorded.calls.append(
            _PromptCall(
                layer_idx=layer_idx,
                queries=query[:, :, -recorded.window :].clone(),
                query_tokens=query.shape[2],
                keys=keys,
                values=values,
                attention_mask=attention_mask,
                scaling=float(scaling),
            )
        )

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
        self._chunk = _Chunk(closes_prompt=False) if self._in_chunked_prefill else _generate_prefill_chunk()

    @contextlib.contextmanager
    def chunked_prefill(self) -> Iterator[None]:
        """Every forward inside this block is one more chunk of its cache's prompt.

        Each chunk is compressed to the budget at the end of its forward, scored with the queries
        of the last ``window_size`` tokens so far, so no layer holds more than about budget + chunk
        entries per KV head; ``press.last_report`` describes the prompt so far. The prompt ends
        with the block: later forwards are appended (a question, decoded tokens).
        ``generate(..., prefill_chunk_size=N)`` needs no such block.
        """
        if self._in_chunked_prefill:
            raise RuntimeError("chunked_prefill() blocks cannot be nested")
        if not self._entered:
            raise RuntimeError("use chunked_prefill() inside `with press(model) as session: ...`")
        self._in_chunked_prefill = True
        try:
            yield
        finally:
            self._in_chunked_prefill = False
            self._chunk = None
            for cache in list(self._open):
                self._prefilled.add(cache)
            self._open.clear()

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
        prompt_forward = (
            cache is not None
            and isinstance(layer, CacheLayerMixin)
            and cache not in self._prefilled
            and (query.shape[2] > 1 or self._chunk is not None)
        )
        if isinstance(layer, CompressedLayer):
            if kwargs.get("softcap") is not None:
                raise ValueError("attention logit softcapping is not supported on a compressed cache")
            if prompt_forward and isinstance(layer, PackedCompressedLayer):
                row = key_mask_from_attention_mask(
                    attention_mask, query.shape[0], layer.seen_tokens, query.device
                )
                layer.mark_padding(row[:, -query.shape[2] :])
            output: tuple[torch.Tensor, torch.Tensor | None] = (layer.attend(query, float(scaling)), None)
        else:
            output = binding.original(module, query, key, value, attention_mask, **kwargs)
        if cache is None or not isinstance(layer, CacheLayerMixin):
            return output
        if prompt_forward:
            if self._recording is not None:
                self._record_call(
                    self._recording, cache, layer_idx, query, key, value, attention_mask, scaling
                )
            self._on_prefill(layer_idx, cache, layer, query, key, value, attention_mask, float(scaling))
        elif cache in self._prefilled and self.decoding is not None:
            self._on_decode(layer_idx, cache, layer, query, key, value, attention_mask, float(scaling))
        return output

    def _state(self, cache: Cache) -> _CacheState:
        state = self._states.get(cache)
        if state is None:
            state = self._states[cache] = _CacheState()
        return state

    def _window_queries(self, state: _CacheState, layer_idx: int, query: torch.Tensor) -> torch.Tensor:
        """The last ``window_size`` queries through this cache and layer, across forwards."""
        window = self.press.window_size
        previous = state.queries.get(layer_idx)
        if previous is not None and query.shape[2] < window:
            query = torch.cat([previous, query], dim=2)
        recent = query[:, :, -window:]
        state.queries[layer_idx] = recent.clone()  # a view would keep the whole forward's queries alive
        return recent

    def _held(
        self, layer: Any, keys: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Every entry the layer holds, its real-entry mask and the number of tokens it has seen."""
        if isinstance(layer, CompressedLayer):
            return (*layer.entries(), layer.seen_tokens)
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"mixkv compresses DynamicCache layers; this layer is a {type(layer).__name__} "
                "(use the default dynamic cache, not a static or quantized one)"
            )
        length = keys.shape[2]
        key_mask = key_mask_from_attention_mask(attention_mask, keys.shape[0], length, keys.device)
        return keys, values, key_mask, length

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
        state = self._state(cache)
        if layer_idx in self.layout.compressible_layers:
            # Sliding-window layers are skipped before their mask is read: it hides more than padding.
            held_keys, held_values, mask, seen = self._held(layer, keys, values, attention_mask)
            record = self._record
            if layer_idx == self.layout.compressible_layers[0] or record is None:
                row = key_mask_from_attention_mask(attention_mask, keys.shape[0], seen, keys.device)
                # A cache's first prompt forward counts what it already held (a prefix filled
                # before the press); later chunks add their own tokens.
                new_tokens = row if state.lengths is None else row[:, -query.shape[2] :]
                record = self._start_record(state, new_tokens.sum(-1).cpu(), mask)
            lengths = torch.tensor(record.lengths, device=keys.device)
            record.kept[:, layer_idx] = lengths.unsqueeze(-1).cpu()
            budgets = torch.tensor(record.budgets, device=keys.device)
            compress_rows = lengths > budgets
            window_queries = self._window_queries(state, layer_idx, query)
            if held_keys.shape[2] <= self.press.window_size:
                record.skipped_layers[layer_idx] = "prompt not longer than the observation window"
            elif window_queries.shape[2] < self.press.window_size:
                record.skipped_layers[layer_idx] = (
                    f"the prefill forward holds {query.shape[2]} tokens, fewer than the observation window"
                )
            elif bool(compress_rows.any()):
                start = time.perf_counter()
                indices = self._compress(
                    layer_idx,
                    cache,
                    window_queries,
                    held_keys,
                    held_values,
                    mask,
                    budgets,
                    compress_rows,
                    scaling,
                    seen,
                    lengths,
                )
                record.compressed_layers.append(layer_idx)
                self._count_visual_tokens(record, mask, indices)
                state.seconds += time.perf_counter() - start
            else:
                record.skipped_layers[layer_idx] = "every prompt fits in its budget"
        if layer_idx == self.layout.num_layers - 1:
            if self._chunk is None or self._chunk.closes_prompt:
                self._prefilled.add(cache)
            else:
                self._open.add(cache)
            self._finish_record(cache, state)

    def _on_decode(
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
        """Bounded decoding: compress a layer again once it holds ``interval`` entries per head more
        than after its last compression (and more than the decoding budget plus ``interval``)."""
        decoding = self.decoding
        if decoding is None or layer_idx not in self.layout.compressible_layers:
            return
        state = self._state(cache)
        window_queries = self._window_queries(state, layer_idx, query)
        held = _mean_held(layer, keys)
        floor = max(state.held_after_compression.get(layer_idx, 0.0), float(decoding.target))
        if (
            held < floor + decoding.interval
            or window_queries.shape[2] < self.press.window_size
            or state.lengths is None
        ):
            return
        held_keys, held_values, mask, seen = self._held(layer, keys, values, attention_mask)
        batch = held_keys.shape[0]
        budgets = torch.full((batch,), decoding.target, dtype=torch.long, device=held_keys.device)
        seen_real = state.lengths.to(held_keys.device) + (seen - state.prompt_tokens)
        self._compress(
            layer_idx,
            cache,
            window_queries,
            held_keys,
            held_values,
            mask,
            budgets,
            torch.ones(batch, dtype=torch.bool, device=held_keys.device),
            scaling,
            seen,
            seen_real,
        )
        state.held_after_compression[layer_idx] = _mean_held(cache.layers[layer_idx], keys)
        decoding.compressions += 1

    def _start_record(
        self, state: _CacheState, new_tokens: torch.Tensor, key_mask: torch.Tensor
    ) -> _PrefillRecord:
        """Bookkeeping of one prompt forward; ``new_tokens`` ``(B,)`` are its real tokens."""
        ids = self._input_ids
        if state.lengths is None and state.prompt_ids is not None:
            ids = state.prompt_ids.to(key_mask.device)
        state.lengths = state.lengths + new_tokens if state.lengths is not None else new_tokens
        lengths = state.lengths
        batch = lengths.shape[0]
        budgets = [self.press.sequence_budget(int(n)) for n in lengths.tolist()]
        record = _PrefillRecord(
            lengths=[int(n) for n in lengths.tolist()],
            budgets=budgets,
            kept=torch.zeros((batch, self.layout.num_layers, self.layout.num_kv_heads), dtype=torch.long),
        )
        # Visual tokens are counted when the ids cover the whole prompt (a one-go prefill, or a
        # declared prompt).
        masks = (
            self.layout.visual_token_masks(ids) if ids is not None and ids.shape == key_mask.shape else None
        )
        if ids is not None and masks is not None:
            real = key_mask.to(ids.device)
            record.is_image, record.is_video = (mask & real for mask in masks)
            record.image_kept = torch.zeros(batch)
            record.video_kept = torch.zeros(batch)
            record.position_kept = torch.zeros(key_mask.shape[0], key_mask.shape[-1])
        self._record = record
        return record

    def _compress(
        self,
        layer_idx: int,
        cache: Cache,
        window_queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_mask: torch.Tensor,
        budgets: torch.Tensor,
        compress_rows: torch.Tensor,
        scaling: float,
        seen_tokens: int,
        context_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the layer by one holding the selected entries and the last ``window_size``.

        ``keys``/``values`` ``(B, Hkv, N, D)`` are everything the layer holds, the newest tokens
        last; ``key_mask`` is ``(B, N)`` or per head ``(B, Hkv, N)``. Returns the selected prefix
        indices and their validity (:func:`select_top_per_head`).
        """
        press = self.press
        window = press.window_size
        length, head_dim = keys.shape[2], keys.shape[3]
        prefix = length - window
        memo_key = (layer_idx, window, press.kernel_size, press.pooling)
        known = None if self._importance_memo is None else self._importance_memo.get(memo_key)
        ctx = ScoringContext(
            queries=window_queries,
            keys=keys,
            values=values,
            key_mask=key_mask,
            scaling=scaling,
            layer_idx=layer_idx,
            compressible_layers=self.layout.compressible_layers,
            budgets=budgets,
            kernel_size=press.kernel_size,
            pooling=press.pooling,
            context_lengths=context_lengths,
            _importance=None if known is None else known.clone(),  # a clone: a press may not spoil it
        )
        head_mask = ctx.head_mask
        prefix_mask = head_mask[..., :prefix]
        # The window is the newest tokens, held densely by every head: its padding is per sequence.
        window_valid = head_mask[:, 0, prefix:]
        counts = torch.where(
            compress_rows.unsqueeze(-1), press.head_budgets(ctx).to(keys.device), context_lengths[:, None]
        )
        available = prefix_mask.sum(-1)
        prefix_counts = torch.minimum((counts - window_valid.sum(-1, keepdim=True)).clamp(min=0), available)
        scores = press.scores(ctx).float()
        if self._importance_memo is not None and known is None and ctx._importance is not None:
            self._importance_memo[memo_key] = ctx._importance
        # Sequences within their budget keep every real prompt token.
        scores = torch.where(compress_rows[:, None, None], scores, torch.zeros_like(scores))
        scores = scores.masked_fill(~prefix_mask, float("-inf"))
        indices, valid = select_top_per_head(scores, prefix_counts)
        gather_index = indices.unsqueeze(-1).expand(-1, -1, -1, head_dim)
        kept_keys = keys[:, :, :prefix].gather(2, gather_index)
        kept_values = values[:, :, :prefix].gather(2, gather_index)
        new_layer: CompressedLayer
        if bool((prefix_counts == prefix_counts.flatten()[0]).all()) and bool(window_valid.all()):
            new_layer = DenseCompressedLayer(
                torch.cat([kept_keys, keys[:, :, prefix:]], dim=2),
                torch.cat([kept_values, values[:, :, prefix:]], dim=2),
                seen_tokens=seen_tokens,
            )
        else:
            new_layer = PackedCompressedLayer(
                kept_keys[valid],
                kept_values[valid],
                prefix_counts.flatten().long(),
                keys[:, :, prefix:].clone(),
                values[:, :, prefix:].clone(),
                window_valid.clone(),
                seen_tokens=seen_tokens,
            )
        cache.layers[layer_idx] = new_layer
        self._created.add(new_layer)
        return indices, valid

    def _count_visual_tokens(
        self, record: _PrefillRecord, key_mask: torch.Tensor, selection: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """Image and video entries kept by a one-go prefill (the forward's ids cover the whole cache)."""
        if record.image_kept is None or record.video_kept is None:
            return
        indices, valid = selection
        prefix = key_mask.shape[-1] - self.press.window_size
        window_valid = key_mask[:, prefix:]
        record.image_kept += _kept_of(record.is_image, indices, valid, prefix, window_valid)
        record.video_kept += _kept_of(record.is_video, indices, valid, prefix, window_valid)
        if record.position_kept is not None:
            batch, heads = indices.shape[0], indices.shape[1]
            in_prefix = torch.zeros(batch, prefix)
            in_prefix.scatter_add_(
                1, indices.reshape(batch, -1).cpu(), valid.reshape(batch, -1).float().cpu()
            )
            record.position_kept[:, :prefix] += in_prefix / heads
            record.position_kept[:, prefix:] += window_valid.float().cpu()

    def _finish_record(self, cache: Cache, state: _CacheState) -> None:
        record = self._record
        self._record = None
        if record is None:
            return
        state.prompt_tokens = cache.get_seq_length(self.layout.compressible_layers[0])
        lengths = torch.tensor(record.lengths)
        full_bytes = 0
        compressed_layers = []
        for layer_idx, layer in enumerate(cache.layers):
            if isinstance(layer, CompressedLayer):
                compressed_layers.append(layer_idx)
                record.kept[:, layer_idx] = layer.held_counts().cpu()
                keys, _ = layer.dense()
                # What a DynamicLayer would hold for every token seen: keys and values.
                full_bytes += (
                    2
                    * keys.shape[0]
                    * keys.shape[1]
                    * layer.seen_tokens
                    * keys.shape[3]
                    * keys.element_size()
                )
                state.held_after_compression[layer_idx] = _mean_held(layer, keys)
            else:
                full_bytes += layer_bytes(layer)
            if layer_idx not in self.layout.compressible_layers:
                held = getattr(layer, "keys", None)
                window = held.shape[-2] if isinstance(held, torch.Tensor) else 0
                record.kept[:, layer_idx] = lengths.clamp(max=window).unsqueeze(-1)
                record.skipped_layers[layer_idx] = (
                    "sliding-window layer (its cache is already bounded by the window)"
                )
        counts: dict[str, Any] = {}
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
            if record.position_kept is not None:
                fraction = (
                    record.position_kept / len(record.compressed_layers)
                    if record.compressed_layers
                    else torch.ones_like(record.position_kept)
                )
                counts["position_keep_fraction"] = fraction
            counts.update(
                {
                    "image_tokens_total": image_total.tolist(),
                    "video_tokens_total": video_total.tolist(),
                    "text_tokens_total": (lengths - image_total - video_total).tolist(),
                    "image_tokens_kept": image_kept.tolist(),
                    "video_tokens_kept": video_kept.tolist(),
                    "text_tokens_kept": (all_kept - image_kept - video_kept).tolist(),
                }
            )
        self.press.last_report = CompressionReport(
            context_lengths=record.lengths,
            budgets=record.budgets,
            kept_tokens=record.kept,
            compressed_layers=compressed_layers,
            skipped_layers=record.skipped_layers,
            full_bytes=full_bytes,
            compressed_bytes=kv_cache_bytes(cache),
            compression_seconds=state.seconds,
            **counts,
        )


def _mean_held(layer: Any, keys: torch.Tensor) -> float:
    """Entries per KV head the layer holds, averaged over heads, for its fullest sequence."""
    if isinstance(layer, CompressedLayer):
        return float(layer.held_counts().float().mean(-1).max())
    return float(keys.shape[2])


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
