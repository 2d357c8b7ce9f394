"""Attaching a press to a model for the duration of a ``with`` block: the press session.

How it works, using only transformers' extension points:

1. An attention function is registered in transformers' attention interfaces under ``mixkv_sdpa`` /
   ``mixkv_eager`` and the text decoder's config is pointed at it
   (:mod:`~mixkv.integration.attention_functions`); it hands every attention call to the session.
2. A forward pre-hook on each decoder attention module records the ``Cache`` object in use, and one
   on the model records the forward's ids and whether it is a chunk of a longer prompt.
3. At the end of prefill (the first multi-token forward through a given ``Cache`` while the press
   is active) the function computes each layer's output over the full prompt, then scores the
   prompt and replaces the layer in the model's own cache by a compressed layer that holds only the
   kept entries (:mod:`~mixkv.integration.layer_compression`). The cache may already hold a prefix
   filled before the ``with`` block (a cached system prompt, a shared document); the whole content
   is then scored with the queries of the forward's last ``window_size`` tokens, exactly as if it
   had been prefilled in one go.
   A prompt may also arrive in chunks: the forwards of ``generate(..., prefill_chunk_size=N)``
   (recognised from ``generate``'s own chunk loop, :mod:`~mixkv.integration.prefill_chunks`) or
   those inside :meth:`PressSession.chunked_prefill`. Each chunk is compressed at the end of its
   forward, scored over everything the layer holds with the queries of the last ``window_size``
   tokens so far, so a layer never holds more than about budget + chunk entries per KV head.
   After the last layer the press's ``last_report`` describes the prompt so far
   (:mod:`~mixkv.integration.prefill_report`).
4. Afterwards, attention over compressed layers is computed by the layers themselves; under a
   :class:`~mixkv.DecodingPress` a layer is compressed again every ``interval`` generated tokens.

On exit (also on exceptions) hooks are removed, the config is restored, the registrations are
dropped when no press remains, and compressed layers refuse further use.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle
from transformers.cache_utils import Cache, CacheLayerMixin

from mixkv.integration.attention_functions import (
    FUNCTION_NAMES,
    AttentionOutput,
    Binding,
    bind,
    is_bound,
    original_attention,
    register_functions,
    unbind,
    unregister_functions,
)
from mixkv.integration.cache import CompressedLayer, PackedCompressedLayer
from mixkv.integration.cache_compressor import CacheCompressor
from mixkv.integration.decoder_layout import (
    DecoderLayout,
    describe_decoder,
    prefill,
    reads_images_as_text,
    rope_inverse_frequencies,
    rotary_tables,
)
from mixkv.integration.layer_tensors import AttentionCall, key_mask_from_attention_mask
from mixkv.integration.prefill_chunks import PrefillChunk, generate_prefill_chunk
from mixkv.integration.prompt_recording import RecordedPrompt
from mixkv.integration.reconstruction import Reconstruction
from mixkv.integration.tensor_parallel import find_head_shard
from mixkv.presses.base import LayerInputs
from mixkv.presses.kvzip import KVzipPress, RepeatChunk

if TYPE_CHECKING:
    from mixkv.presses.base import BasePress
    from mixkv.presses.decoding import DecodingPress


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
        # layer -> the cos/sin tables its attention module was given in the current forward
        self._rotary: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._compressor = CacheCompressor(
            press,
            self.layout,
            decoding,
            rope_frequencies=rope_inverse_frequencies(model, self.layout),
            head_shard=find_head_shard(self.layout),
        )
        self._input_ids: torch.Tensor | None = None
        # Caches whose prompt this session has handled: later forwards through them only append
        # (or, under a DecodingPress, are compressed every `interval` tokens).
        self._prefilled: weakref.WeakSet[Cache] = weakref.WeakSet()
        # Caches whose prompt is arriving in chunks inside `chunked_prefill()`.
        self._open: weakref.WeakSet[Cache] = weakref.WeakSet()
        self._chunk: PrefillChunk | None = None
        self._in_chunked_prefill = False
        self._entered = False
        self._recording: RecordedPrompt | None = None
        # layer -> the attention module's (args, kwargs) in the running forward, for presses that
        # score from them (``press.needs_layer_inputs``)
        self._module_inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._rotary_emb: torch.nn.Module | None = None
        # KVzip: the prompt forward's attention calls, compressed after the reconstruction forwards
        self._deferred: dict[int, AttentionCall] = {}
        self._deferred_cache: Cache | None = None
        self._deferred_ids: torch.Tensor | None = None
        self._deferred_embeddings: torch.Tensor | None = None
        # KVzip on an image prompt: the text decoder's input embeddings of the last forward, and
        # whether the model read that forward's images like text (causal, 1-D positions).
        self._decoder_embeddings: torch.Tensor | None = None
        self._images_as_text = True
        self._reconstruction: Reconstruction | None = None

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> PressSession:
        if self._entered:
            raise RuntimeError("this press session is already active")
        modules = self.layout.attention_modules
        if any(is_bound(m) for m in modules):
            raise ValueError(
                "another mixkv press is already attached to this model; nesting presses is not supported"
            )
        if self.press.needs_reconstruction:
            if isinstance(self.press, KVzipPress):
                self.press.check_prompt_ids()
            if self.decoding is not None:
                raise ValueError(
                    f"{type(self.press).__name__} cannot run under a DecodingPress: its re-compressions "
                    "have no reconstruction forward to score with"
                )
        self._entered = True
        register_functions()
        try:
            implementation = self.layout.text_config._attn_implementation
            for layer_idx, module in enumerate(modules):
                binding = Binding(self, layer_idx, original_attention(module, implementation))
                self._bound.append(bind(module, binding))
                self._handles.append(
                    module.register_forward_pre_hook(self._capture_cache(layer_idx), with_kwargs=True)
                )
            self._handles.append(self.model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True))
            if self.press.needs_reconstruction:
                self._handles.append(self.model.register_forward_hook(self._reconstruct_after_forward))
                if self.layout.image_token_id is not None or self.layout.video_token_id is not None:
                    model: Any = self.model  # transformers' PreTrainedModel (typed as a Module here)
                    decoder = model.get_decoder()
                    self._handles.append(
                        decoder.register_forward_pre_hook(self._capture_decoder_embeddings, with_kwargs=True)
                    )
            if self.press.needs_layer_inputs:
                self._rotary_emb = _text_rotary_embedding(self.model, modules)
            self._saved_implementation = implementation
            # Set the internal attribute: the public setter would also switch the vision tower.
            self.layout.text_config._attn_implementation_internal = FUNCTION_NAMES[implementation]
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
            unbind(key)
        self._bound.clear()
        if self._saved_implementation is not None:
            self.layout.text_config._attn_implementation_internal = self._saved_implementation
            self._saved_implementation = None
        for layer in list(self._compressor.created):
            layer.active = False
        self._compressor.clear()
        self._caches.clear()
        self._rotary.clear()
        self._input_ids = None
        self._prefilled.clear()
        self._open.clear()
        self._chunk = None
        self._in_chunked_prefill = False
        self._recording = None
        self._module_inputs.clear()
        self._rotary_emb = None
        self._deferred.clear()
        self._deferred_cache = self._deferred_ids = self._deferred_embeddings = None
        self._decoder_embeddings = None
        self._reconstruction = None
        if self._entered:
            self._entered = False
            unregister_functions()

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
        self._take_over(copied)
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
        self._take_over(cache)

    def _take_over(self, cache: Cache) -> None:
        """Treat ``cache`` as prefilled by this session, its compressed layers as made by it."""
        self._prefilled.add(cache)
        for layer in cache.layers:
            if isinstance(layer, CompressedLayer):
                self._compressor.created.add(layer)

    def declare_prompt(
        self, cache: Cache, input_ids: torch.Tensor, embeddings: torch.Tensor | None = None
    ) -> None:
        """Give the ids of the whole prompt that the next forward through ``cache`` completes.

        For prompts whose last forward does not carry all their ids: a prefix prefilled into
        ``cache`` before the press (e.g. one full-cache prefix copied for several presses), or a
        rest fed as ``inputs_embeds``. Compression is the same either way (prefix and rest are
        scored together); the ids let the report count image and video tokens over the whole
        prompt, as it does for a one-go prefill. ``embeddings`` ``(B, N, D)``: the whole prompt's
        input embeddings as the text decoder receives them (image features merged in), which
        KVzip needs to repeat an image prompt that continues a prefix.

        Raises
        ------
        ValueError
            If ``input_ids`` is not ``(B, N)`` with N more than the tokens ``cache`` holds, or the
            cache has already had a prompt forward in this session.
        """
        state = self._compressor.state(cache)
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
        if embeddings is not None and (embeddings.dim() != 3 or embeddings.shape[:2] != input_ids.shape):
            raise ValueError(
                f"declare_prompt's embeddings must be (batch, N, hidden) for ids {tuple(input_ids.shape)}; "
                f"got {tuple(embeddings.shape)}"
            )
        state.prompt_ids = input_ids
        state.prompt_embeddings = embeddings

    # -- prompt recording ---------------------------------------------------------------------
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
        self._refuse_replay("recording_prompt()")
        recorded = RecordedPrompt(window=window if window is not None else self.press.window_size)
        self._recording, self._compressor.importance_memo = recorded, recorded.importance
        try:
            yield recorded
        finally:
            self._recording = self._compressor.importance_memo = None

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
        self._refuse_replay("compress_recorded()")
        recorded.check_replayable(self.layout, self.press.window_size, type(self.model).__name__)
        cache = recorded.full_cache()
        self._input_ids = recorded.input_ids
        self._chunk = None
        self._compressor.state(cache).prompt_ids = recorded.prompt_ids
        self._compressor.importance_memo = recorded.importance
        try:
            for call in recorded.calls:
                self._on_prefill(call, cache)
        finally:
            self._compressor.importance_memo = None
        return cache

    def _refuse_replay(self, what: str) -> None:
        if self.press.needs_layer_inputs:
            raise ValueError(
                f"{what} is not available under {type(self.press).__name__}: it scores from the attention "
                "modules' inputs, which a recording does not keep; prefill the prompt under it"
            )

    # -- hooks ----------------------------------------------------------------------------------
    def _capture_cache(self, layer_idx: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._reconstruction is not None:
                self._reconstruction.remember(layer_idx)
                return
            # The argument is `past_key_values` up to transformers 5.23 and `cache` from 5.24 on.
            found = (value for value in (*args, *kwargs.values()) if isinstance(value, Cache))
            self._caches[layer_idx] = next(found, None)
            rotary = kwargs.get("position_embeddings")
            self._rotary[layer_idx] = rotary_tables(rotary, getattr(module, "config", None))
            if self.press.needs_layer_inputs:
                self._module_inputs[layer_idx] = (args, kwargs)

        return hook

    def _capture_inputs(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._reconstruction is not None:  # the reconstruction forwards are not prompts
            return
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids = args[0]
        self._input_ids = input_ids if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else None
        self._images_as_text = reads_images_as_text(self.model, kwargs)
        # Called from this hook: generate_prefill_chunk reads the frames above it.
        self._chunk = (
            PrefillChunk(closes_prompt=False) if self._in_chunked_prefill else generate_prefill_chunk()
        )

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
        binding: Binding,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> AttentionOutput:
        """One layer's attention: over the compressed layer if it is one, else the model's own
        function; then compress the layer at the end of a prompt forward (or while decoding)."""
        layer_idx = binding.layer_idx
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        if self._reconstruction is not None:
            output_ = binding.original(module, query, key, value, attention_mask, **kwargs)
            self._reconstruction.score(layer_idx, query, key, float(scaling))
            return output_
        cache = self._caches.get(layer_idx)
        layer = cache.layers[layer_idx] if cache is not None and layer_idx < len(cache.layers) else None
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
            output: AttentionOutput = (layer.attend(query, float(scaling)), None)
        else:
            output = binding.original(module, query, key, value, attention_mask, **kwargs)
        if cache is None or not isinstance(layer, CacheLayerMixin):
            return output
        rotary = self._rotary.get(layer_idx)
        if rotary is not None and rotary[0].shape[1] != query.shape[2]:
            rotary = None
        call = AttentionCall(
            layer_idx,
            query,
            key,
            value,
            attention_mask,
            float(scaling),
            rotary,
            layer_inputs=self._layer_inputs(module, layer_idx, output[1]),
        )
        if prompt_forward:
            if self._recording is not None:
                if self._chunk is not None:
                    raise ValueError("recording_prompt() records a prompt run in one forward, not in chunks")
                self._recording.add(call, self._input_ids, self._compressor.state(cache).prompt_ids)
            if self.press.needs_reconstruction:
                self._defer(call, cache)
            else:
                self._on_prefill(call, cache)
        elif cache in self._prefilled and self.decoding is not None:
            self._compressor.on_decode(call, cache)
        return output

    def _layer_inputs(
        self, module: torch.nn.Module, layer_idx: int, attentions: torch.Tensor | None
    ) -> LayerInputs | None:
        """The attention module's inputs in this forward, for a press that scores from them."""
        captured = self._module_inputs.pop(layer_idx, None)
        if not self.press.needs_layer_inputs or captured is None:
            return None
        args, kwargs = captured
        forward_kwargs = dict(kwargs)
        if args:  # the hidden states, where the decoder layer passes them positionally
            forward_kwargs.setdefault("hidden_states", args[0])
        return LayerInputs(
            model=self.model,
            module=module,
            hidden_states=forward_kwargs["hidden_states"],
            attentions=attentions,
            forward_kwargs=forward_kwargs,
            rotary_emb=self._rotary_emb,
        )

    # -- KVzip: reconstruction forwards --------------------------------------------------------------
    def _capture_decoder_embeddings(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if self._reconstruction is None:
            embeddings = kwargs.get("inputs_embeds")
            self._decoder_embeddings = embeddings if isinstance(embeddings, torch.Tensor) else None

    def _image_prompt_embeddings(self, ids: torch.Tensor, cache: Cache) -> torch.Tensor | None:
        """The decoder's input embeddings of an image (or video) prompt, for a repeat that reads its
        images again (this forward's, or those declared with a prompt continuing a prefix); None
        for a text prompt. Refuses what the repeat cannot read as the prompt was read: a prompt
        continuing a prefix without them, M-RoPE positions (Qwen-VL) and per-token image attention
        (Gemma 3's bidirectional image blocks)."""
        visual = self.layout.visual_token_masks(ids)
        if visual is None or not bool((visual[0] | visual[1]).any()):
            return None
        name = type(self.press).__name__
        if not self._images_as_text:
            raise ValueError(
                f"{name} repeats an image prompt as causal 1-D positions after it, which "
                f"{type(self.model).__name__} does not read images with (M-RoPE or per-token image "
                "attention); use another press for its image prompts"
            )
        state = self._compressor.state(cache)
        embeddings = state.prompt_embeddings if state.prompt_ids is not None else self._decoder_embeddings
        if embeddings is None or embeddings.shape[:2] != ids.shape:
            raise ValueError(
                f"{name} reads an image prompt's images again in its repeat: prefill the whole prompt "
                "(ids and pixel values) in one forward under the press, or declare the prompt with its "
                "embeddings (session.declare_prompt(cache, ids, embeddings))"
            )
        return embeddings

    def _defer(self, call: AttentionCall, cache: Cache) -> None:
        """Keep a prompt forward's layer for compression once the reconstruction has scored it."""
        name = type(self.press).__name__
        if self._recording is not None:
            raise ValueError(f"recording_prompt() is not available under {name}: prefill the prompt under it")
        if self._chunk is not None:
            raise ValueError(f"{name} needs the whole prompt in one forward: do not prefill it in chunks")
        # The prompt's ids: declared (a forward continuing a prefix) or those the forward carries.
        declared = self._compressor.state(cache).prompt_ids
        ids = declared if declared is not None else self._input_ids
        if ids is None or ids.shape[0] != 1 or call.keys.shape[0] != 1:
            raise ValueError(
                f"{name} reconstructs one prompt at a time from its token ids: call the model with "
                "input_ids of shape (1, N) (no batch, no inputs_embeds)"
            )
        if call.keys.shape[2] != ids.shape[1] and call.layer_idx in self.layout.compressible_layers:
            raise ValueError(
                f"{name} reconstructs the whole prompt: the cache held {call.keys.shape[2] - ids.shape[1]} "
                "entries before this forward; prefill the whole prompt under the press, or declare the whole "
                "prompt's ids first (session.declare_prompt(cache, ids))"
            )
        embeddings = self._image_prompt_embeddings(ids, cache)
        window = self.press.window_size
        rotary = call.rotary
        if rotary is not None:
            rotary = (rotary[0][:, -window:], rotary[1][:, -window:])
        # Only the window's queries are needed later (the keys are the cache's own tensors).
        self._deferred[call.layer_idx] = dataclasses.replace(
            call, query=call.query[:, :, -window:].clone(), rotary=rotary
        )
        if call.layer_idx == self.layout.num_layers - 1:
            self._deferred_cache, self._deferred_ids, self._deferred_embeddings = cache, ids, embeddings

    def _reconstruct_after_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        """After the prompt forward: run the repeat chunks, then compress every layer with their scores."""
        cache, calls, ids = self._deferred_cache, dict(self._deferred), self._deferred_ids
        embeddings = self._deferred_embeddings
        self._deferred.clear()
        self._deferred_cache = self._deferred_ids = self._deferred_embeddings = None
        press = self.press
        if (
            cache is None
            or self._reconstruction is not None
            or ids is None
            or not isinstance(press, KVzipPress)
        ):
            return
        memo = press.reconstruction_memo
        key = press.reconstruction_key(ids, embeddings) if memo is not None else None
        press.last_reconstruction_reused = memo is not None and key in memo
        if memo is not None and key in memo:
            scores, press.last_reconstruction_seconds = memo[key]
        else:
            scores, press.last_reconstruction_seconds = self._reconstruct(press, cache, ids, embeddings)
            if memo is not None and key is not None:
                memo[key] = (scores, press.last_reconstruction_seconds)
        self._compressor.reconstruction_scores = scores
        try:
            for layer_idx in sorted(calls):
                self._on_prefill(calls[layer_idx], cache)
        finally:
            self._compressor.reconstruction_scores = None

    def _reconstruct(
        self, press: KVzipPress, cache: Cache, ids: torch.Tensor, embeddings: torch.Tensor | None
    ) -> tuple[dict[int, torch.Tensor], float]:
        """Run the press's repeat chunks of prompt ``ids`` through ``cache`` (left as it was):
        per layer, the KVzip scores of its entries, and the seconds the forwards took. With the
        prompt's input ``embeddings`` (an image prompt) each repeat goes in as embeddings, the
        context's copies taking the prompt's own (image features included)."""
        reconstruction = Reconstruction(cache, ids.shape[1], press.n_sink, self.layout.compressible_layers)
        start = time.perf_counter()
        self._reconstruction = reconstruction
        try:
            with torch.no_grad():
                for chunk in press.repeat_chunks(ids):
                    reconstruction.chunk = chunk
                    if embeddings is None:
                        prefill(self.model, chunk.ids, cache)
                    else:
                        prefill(
                            self.model,
                            None,
                            cache,
                            inputs_embeds=_repeat_embeddings(self.model, chunk, embeddings),
                        )
        finally:
            self._reconstruction = None
            reconstruction.restore()
        return reconstruction.scores, time.perf_counter() - start

    def _on_prefill(self, call: AttentionCall, cache: Cache) -> None:
        """One layer of a prompt forward; after the last, the prompt ends unless a chunk is open."""
        self._compressor.on_prefill(call, cache, self._input_ids)
        if call.layer_idx == self.layout.num_layers - 1:
            if self._chunk is None or self._chunk.closes_prompt:
                self._prefilled.add(cache)
            else:
                self._open.add(cache)
            self._compressor.finish_prompt_forward(cache)


def _repeat_embeddings(model: Any, chunk: RepeatChunk, prompt: torch.Tensor) -> torch.Tensor:
    """A repeat chunk's input embeddings: its ids embedded, then the prompt's decoder inputs where
    it copies the context, so its image tokens carry the image features again."""
    rows: torch.Tensor = model.get_input_embeddings()(chunk.ids).to(prompt.dtype)
    for row, first, last in chunk.copies:
        rows[:, row : row + last - first] = prompt[:, first:last]
    return rows


def _text_rotary_embedding(
    model: torch.nn.Module, attention_modules: list[torch.nn.Module]
) -> torch.nn.Module | None:
    """The rotary embedding module of the text decoder holding ``attention_modules`` (its
    ``rotary_emb``, beside its ``layers``), or None where it has none."""
    first = attention_modules[0]
    for module in model.modules():
        rotary = getattr(module, "rotary_emb", None)
        layers = getattr(module, "layers", None)
        if (
            isinstance(rotary, torch.nn.Module)
            and isinstance(layers, torch.nn.ModuleList)
            and any(sub is first for layer in layers for sub in layer.modules())
        ):
            return rotary
    return None
