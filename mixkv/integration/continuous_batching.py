"""mixkv presses inside transformers' continuous-batching engine: serve more requests per memory.

Each request's prompt is compressed at the end of its prefill, inside the engine's paged cache,
exactly as ``with press(model): model.generate(...)`` compresses it (same scores, same kept
entries); the pages it no longer needs go back to the pool for other requests, and its new tokens
keep their true positions. Usage::

    import mixkv
    from mixkv.integration.continuous_batching import PressBatchingManager, generate_batch

    # One call, like model.generate_batch: {request id: GenerationOutput}, in input order.
    outputs = generate_batch(model, [ids_1, ids_2, ...], press=mixkv.SnapKVPress(budget=128),
                             max_new_tokens=64)

    # A manager, for a server: the default press, and one per request if needed.
    with PressBatchingManager(model, press=mixkv.MixKVPress(budget=128), max_cache_tokens=32768) as manager:
        rid = manager.add_request(ids, max_new_tokens=64)  # the manager's press
        manager.add_request(other_ids, press=mixkv.KeyDiffPress(budget=64))  # another press
        manager.add_request(short_ids, press="full")  # no press for this request
        result = manager.get_result(rid, timeout=30)  # transformers' API: start/stop/add_request/
                                                      # cancel_request/request_id_iter/get_result
        manager.page_usage()  # PageUsage(total, free, pages and tokens per live request)
        manager.compression_info(rid)  # PrefillCompression(prompt_tokens, kept_tokens, freed_pages...)

What is supported
-----------------
* Presses with one budget for every layer and KV head: SnapKV, MixKV on SnapKV, KeyDiff, Knorm,
  StreamingLLM, Random (``budget=`` or ``compression_ratio=``). Refused by name, with the reason:
  AdaKV, SparseMM and MixKV on them (per-head budgets: a page slot holds every KV head, and the
  mask is shared by the heads), kvpress presses.
* Per-layer budgets: PyramidKV and MixKV-PyramidKV. A request's paged cache has one length for
  every layer, so layer ``l`` keeps its ``k_l`` entries in slots ``0..k_l-1``, the request's
  length becomes ``max_l k_l``, and the attention function masks slots ``k_l..max-1`` of layer
  ``l`` for that request (in a copy of the batch's mask, columns found from ``cu_seq_lens_k``).
  Outputs are ``generate``'s; but the request holds pages for its **largest** layer budget (about
  twice the mean with the default ``beta``), not for the mean: PyramidKV frees fewer pages than
  SnapKV at the same budget. ``compression_info(...).kept_tokens`` is that largest count.
* ``DecodingPress(press, budget=target, interval=N)`` around a uniform press (around per-layer
  budgets it is refused: each layer would reach its bound at its own step): bounded decoding.
  A request is compressed again, in every layer, once it holds ``N`` entries more than
  ``max(target, what it kept last)``, with the rule of ``with DecodingPress(...)(model):
  model.generate(...)`` (the queries of its last ``window_size`` tokens across decode steps, the
  same scores and kept entries), so its output is that of ``generate``; the kept ``target``
  entries go to its first slots, its pages beyond them back to the pool, and a request never holds
  more than ``max(prompt budget, target) + N`` tokens (``N - 1`` between two steps). Its
  ``compressions`` counts the layer compressions of all requests.
* Full-attention models (Llama, Mistral without sliding window, Qwen2/3, Phi-3...) under ``sdpa``
  or ``eager``; sliding-window models (Gemma 3) and other attention implementations are refused.
* A prompt no longer than its budget is not compressed: its output is exactly the engine's
  without a press.
* A prompt that the engine prefills in several chunks (longer than ``max_batch_tokens``) is
  compressed once, when its prefill completes, scored with the queries of its last
  ``window_size`` tokens across chunks, so the result equals the one-go prefill. Peak memory of a
  request is therefore its whole prompt, until its prefill completes.

How, and what it relies on
--------------------------
:class:`PressBatchingManager` subclasses transformers' ``ContinuousBatchingManager``. It forces
sync batching (batch N+1 must see batch N's compressed lengths), no block sharing (compression
rewrites a request's first pages, which must be its own), no CUDA graphs or compile (compression
branches in Python on each forward), and ``paged|eager`` as the attention name, over which an
attention function that runs the model's own attention (``sdpa`` or eager) then compresses is
registered while the manager runs (:mod:`~mixkv.integration.paged_compression`). It wraps the batch
processor's ``prepare_next_batch`` and ``update_batch``. Internals used, written against
transformers 5.25 (older releases are refused with a message naming the version needed):
``ContinuousBatchingManager._create_batch_processor``, the batch processor's
``inputs_and_outputs.requests_in_batch`` / ``position_ids`` and ``scheduler.active_requests`` /
``waiting_requests``, ``RequestState.position_offset``, the paged cache's
``cache_allocators``, ``layer_to_allocator`` and ``pool``, and the full-attention allocator's
``block_table``, ``ledger``, ``get_write_indices`` and ``update``.

``with press(model): model.generate_batch(...)`` is not supported: ``generate_batch`` builds its
own manager (sized per call) unless one is cached in the model's private
``_cached_continuous_batching_manager``, and a press session points the model at mixkv's own
attention names, which the engine refuses. Use :func:`generate_batch` here instead.
"""

from __future__ import annotations

import copy
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import GenerationConfig

from mixkv.integration.paged_compression import (
    PAGED_NAME,
    PagedCompressor,
    PrefillCompression,
    bind,
    original_paged_function,
    unbind,
)
from mixkv.integration.paged_support import (
    check_model,
    check_press,
    engine_unavailable_reason,
    most_kept,
)
from mixkv.presses.base import BasePress
from mixkv.presses.decoding import DecodingPress

_UNAVAILABLE = engine_unavailable_reason()
if TYPE_CHECKING or _UNAVAILABLE is None:
    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.continuous_api import (
        ContinuousBatchingManager as _EngineManager,
    )
    from transformers.generation.continuous_batching.requests import GenerationOutput
else:  # the module imports; building a manager says what is missing
    _EngineManager = object
    ContinuousBatchingConfig = GenerationOutput = Any

__all__ = [
    "FULL",
    "PageUsage",
    "PrefillCompression",
    "PressBatchingManager",
    "generate_batch",
]

#: ``add_request(..., press=FULL)``: no press for this request, whatever the manager's default.
FULL: Literal["full"] = "full"
#: Defaults of the batching config built when none is given (small pages so compression frees memory).
DEFAULT_PAGE_SIZE = 16
DEFAULT_CACHE_TOKENS = 8192
DEFAULT_MAX_BATCH_TOKENS = 256
_KEEP_RECORDS = 4096

AnyPress = BasePress | DecodingPress
PressArg = BasePress | DecodingPress | Literal["full"] | None


@dataclass(frozen=True)
class PageUsage:
    """The paged cache at one moment; a page is ``page_size`` tokens of every layer (a transformers block).

    Attributes
    ----------
    page_size : int
    total, free : int
        Pages in the cache, and pages free for new tokens.
    pages : dict[str, int]
        Pages held by each request that holds some.
    tokens : dict[str, int]
        Tokens (entries per KV head and layer) cached for each active request.
    """

    page_size: int
    total: int
    free: int
    pages: dict[str, int]
    tokens: dict[str, int]

    @property
    def in_use(self) -> int:
        return self.total - self.free


class PressBatchingManager(_EngineManager):
    """transformers' continuous-batching manager, compressing each request's prompt with a mixkv press.

    Parameters
    ----------
    model : PreTrainedModel
        A full-attention decoder loaded with ``sdpa`` or ``eager`` attention.
    press : BasePress, optional
        The default press of the requests (None: full cache). ``add_request(press=...)`` overrides
        it for one request (``press="full"``, :data:`FULL`: no press for that request).
    generation_config : GenerationConfig, optional
        Defaults to ``model.generation_config``.
    batching_config : ContinuousBatchingConfig, optional
        The engine's sizing. Default: ``page_size=16``, ``max_batch_tokens=256`` and enough pages
        for ``max_cache_tokens`` tokens (transformers' own default sizes the cache from 60 % of
        free RAM on CPU, which costs seconds and gigabytes). A given config is copied; block
        sharing, async batching, CUDA graphs, the flash decode fast path and flash auto-switch are
        turned off (asking explicitly for async batching, CUDA graphs or compile is refused).
    max_cache_tokens : int, optional
        Size the cache for this many tokens (all requests together); default 8192, or the given
        config's ``num_blocks``.
    block_sharing : bool, default False
        Keep transformers' prefix sharing on: a full-cache-only manager, which refuses presses
        (compression would overwrite shared prefix pages).

    Every other method is transformers' (``start``, ``stop``, ``add_request``, ``add_requests``,
    ``cancel_request``, ``get_result``, ``request_id_iter``, ``register_result_handler``); the
    manager is also a context manager (``start`` on entry, ``stop`` on exit).
    """

    def __init__(
        self,
        model: Any,
        *,
        press: AnyPress | None = None,
        generation_config: GenerationConfig | None = None,
        batching_config: ContinuousBatchingConfig | None = None,
        max_cache_tokens: int | None = None,
        block_sharing: bool = False,
    ) -> None:
        if _UNAVAILABLE is not None:
            raise RuntimeError(_UNAVAILABLE)
        if press is not None:
            if block_sharing:
                raise ValueError(
                    "block_sharing=True cannot be combined with a press: compression rewrites a request's first "
                    "pages, which prefix sharing hands to other requests"
                )
            check_press(press)
        generation_config = generation_config if generation_config is not None else model.generation_config
        if press is not None and (generation_config.num_return_sequences or 1) > 1:
            raise ValueError("num_return_sequences > 1 is not supported with a press (forks are untested)")
        self.default_press = press
        self.block_sharing = block_sharing
        self._lock = threading.RLock()
        self._press_by_request: dict[str, AnyPress | None] = {}
        self._seen: set[str] = set()
        self._records: OrderedDict[str, PrefillCompression] = OrderedDict()
        self._callbacks: list[Callable[[PressBatchingManager], None]] = []
        self._compressor: PagedCompressor | None = None
        self._bound = False
        if not block_sharing:
            layout = check_model(model)
            implementation = layout.text_config._attn_implementation
            original = (
                original_paged_function() if implementation == "eager" else _sdpa_function(implementation)
            )
            self._layout = layout
            self._compressor = PagedCompressor(layout, original, self._press_by_request.get)
        config = _batching_config(batching_config, max_cache_tokens, block_sharing)
        self.model = model
        self._original_attn_impl = None
        try:
            super().__init__(model, generation_config, config)
            # Built now (not in the worker thread) so that the cache's size is known before start().
            self.batch_processor = self._create_batch_processor()
        except BaseException:
            self._release_model()
            raise

    # -- sizes and reports ---------------------------------------------------------------------------
    @property
    def cache_capacity_tokens(self) -> int:
        """The most tokens one request can ever hold: a longer prompt (or prompt plus answer, for a
        request without a press) can never be scheduled."""
        return self._capacity

    def page_usage(self) -> PageUsage:
        """Pages in use and free, and per live request (a consistent snapshot between two steps)."""
        with self._lock:
            processor = self.batch_processor
            if processor is None:
                raise RuntimeError("the manager has no cache: it was stopped")
            cache = processor.cache
            allocator = next(iter(cache.cache_allocators.values()))
            free = cache.pool.count_free_blocks(allocator.index)
            free += cache.pool.num_free_sectors * allocator.blocks_per_sector
            return PageUsage(
                page_size=allocator.tokens_per_page,
                total=allocator.num_blocks,
                free=free,
                pages={rid: len(table) for rid, table in allocator.block_table.items() if table},
                tokens={
                    rid: state.position_offset for rid, state in processor.scheduler.active_requests.items()
                },
            )

    def compression_info(self, request_id: str) -> PrefillCompression | None:
        """What the end of a request's prefill kept and freed (None before it; the last 4096 kept)."""
        with self._lock:
            return self._records.get(request_id)

    def add_step_callback(self, callback: Callable[[PressBatchingManager], None]) -> None:
        """Call ``callback(manager)`` after every engine step, in the engine's thread (metrics, checks)."""
        self._callbacks.append(callback)

    # -- requests ------------------------------------------------------------------------------------
    def add_request(
        self,
        input_ids: list[int],
        request_id: str | None = None,
        max_new_tokens: int | None = None,
        streaming: bool = False,
        record_timestamps: bool = False,
        eos_token_id: int | list[int] | None = None,
        *,
        press: PressArg = None,
        **logit_processor_kwargs: Any,
    ) -> str | None:
        """transformers' ``add_request``, plus ``press``: None for the manager's press, a mixkv press
        for this request, or ``"full"`` (:data:`FULL`) for none.

        Raises
        ------
        ValueError
            For a press refused in continuous batching (named, with the reason), a press on a
            block-sharing manager, or a request that can never fit in the cache.
        """
        chosen = self._resolve_press(press)
        prompt = len(input_ids)
        new_tokens = self.generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
        layers = len(self._layout.compressible_layers) if self._compressor is not None else 1
        held = _most_held(chosen, prompt, new_tokens, layers)
        if prompt > self._capacity or held > self._capacity:
            raise ValueError(
                f"a request of {prompt} prompt tokens and {new_tokens} new tokens (at most {held} held) can never fit in "
                f"this cache of {self._capacity} tokens (cache_capacity_tokens); give the manager a larger "
                "max_cache_tokens or shorten the request"
            )
        if request_id is None:
            with self._request_lock:
                request_id = f"req_{self._request_counter}"
                self._request_counter += 1
        self._press_by_request[request_id] = chosen
        added = super().add_request(
            input_ids,
            request_id=request_id,
            max_new_tokens=max_new_tokens,
            streaming=streaming,
            record_timestamps=record_timestamps,
            eos_token_id=eos_token_id,
            **logit_processor_kwargs,
        )
        if added is None:
            self._press_by_request.pop(request_id, None)
        return added

    def _resolve_press(self, press: PressArg) -> AnyPress | None:
        if press is None:
            return self.default_press
        if isinstance(press, str):
            if press != FULL:
                raise ValueError(f"press must be a mixkv press, None or {FULL!r}; got {press!r}")
            return None
        if self.block_sharing:
            raise ValueError(
                "this manager keeps block sharing on (block_sharing=True), so it serves full caches only: "
                "compression would rewrite prefix pages shared with other requests"
            )
        check_press(press)
        return press

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> PressBatchingManager:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop(block=True, hard_stop=exc is not None)

    def start(self) -> None:
        """transformers' ``start``; the cache is built first, so :meth:`page_usage` works at once, and
        the model is pointed at the press's attention again after a :meth:`stop`."""
        if not self.is_running():
            self.switch_to_cb_friendly_attn(self.model)
            if self.batch_processor is None:
                self.batch_processor = self._create_batch_processor()
        super().start()

    def switch_to_cb_friendly_attn(self, model: Any, auto_switch_to_flash: bool = True) -> None:
        """Point the model at ``paged|eager``, over which the press's attention is registered."""
        if self._compressor is None:
            super().switch_to_cb_friendly_attn(model, auto_switch_to_flash)
            return
        implementation = model.config._attn_implementation
        if implementation != PAGED_NAME:
            model.set_attn_implementation(PAGED_NAME)
            self._original_attn_impl = implementation
        if not self._bound:
            bind(self._layout.attention_modules, self._compressor)
            self._bound = True

    def stop(
        self,
        block: bool = True,
        timeout: float | None = None,
        keep_for_next_session: bool = False,
        hard_stop: bool = False,
    ) -> None:
        """transformers' ``stop``; once the engine's thread is gone, the model gets its attention back."""
        if self._generation_thread is not None:
            super().stop(block, timeout, keep_for_next_session, hard_stop)
        elif not keep_for_next_session:
            self.batch_processor = None
        if not self.is_running():
            self._release_model()

    def _release_model(self) -> None:
        if self._original_attn_impl is not None:
            self.model.set_attn_implementation(self._original_attn_impl)
            self._original_attn_impl = None
        if self._compressor is not None and self._bound:
            unbind(self._compressor)
            self._bound = False

    # -- the engine's thread -----------------------------------------------------------------------------
    def _create_batch_processor(self) -> Any:
        processor = super()._create_batch_processor()
        allocators = list(processor.cache.cache_allocators.values())
        self._capacity = min(a.num_blocks * a.tokens_per_page for a in allocators)
        if self._compressor is not None and not getattr(processor, "_mixkv_wrapped", False):
            self._wrap(processor)
        return processor

    def _wrap(self, processor: Any) -> None:
        compressor = self._compressor
        assert compressor is not None
        compressor.cache = processor.cache
        prepare, update = processor.prepare_next_batch, processor.update_batch

        def prepare_next_batch() -> bool:
            with self._lock:
                ready = prepare()
                self._forget_gone_requests(processor.scheduler)
                if ready:
                    io = processor.inputs_and_outputs
                    self._seen.update(future.state.request_id for future in io.requests_in_batch)
                    compressor.begin_batch(io.requests_in_batch, io.position_ids)
                return bool(ready)

        def update_batch() -> None:
            with self._lock:
                for record in compressor.finish_batch():
                    self._records[record.request_id] = record
                    self._records.move_to_end(record.request_id)
                    while len(self._records) > _KEEP_RECORDS:
                        self._records.popitem(last=False)
                update()
                for callback in self._callbacks:
                    callback(self)

        processor.prepare_next_batch = prepare_next_batch
        processor.update_batch = update_batch
        processor._mixkv_wrapped = True

    def _forget_gone_requests(self, scheduler: Any) -> None:
        """Drop the presses of requests the engine no longer holds (finished, cancelled, failed)."""
        for request_id in list(self._seen):
            if request_id not in scheduler.active_requests and request_id not in scheduler.waiting_requests:
                self._seen.discard(request_id)
                self._press_by_request.pop(request_id, None)


def _most_held(press: AnyPress | None, prompt: int, new_tokens: int | None, num_layers: int) -> int:
    """The most tokens a request may hold at once (an upper bound)."""
    inner = press.press if isinstance(press, DecodingPress) else press
    kept = prompt if inner is None else most_kept(inner, prompt, num_layers)
    if new_tokens is None:
        return kept
    most = kept + new_tokens
    if isinstance(press, DecodingPress):  # compressed again once it holds interval more than the floor
        most = min(most, max(kept, press.target) + press.interval)
    return most


def _sdpa_function(implementation: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[implementation]


def _batching_config(
    given: ContinuousBatchingConfig | None, max_cache_tokens: int | None, block_sharing: bool
) -> ContinuousBatchingConfig:
    """The engine's config: small pages by default, and what compression needs forced."""
    if given is None:
        tokens = DEFAULT_CACHE_TOKENS if max_cache_tokens is None else max_cache_tokens
        config = ContinuousBatchingConfig(
            page_size=DEFAULT_PAGE_SIZE,
            num_blocks=math.ceil(tokens / DEFAULT_PAGE_SIZE),
            max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS,
        )
    else:
        config = copy.deepcopy(given)  # the engine resolves its config in place
        if max_cache_tokens is not None:
            if config.num_blocks is not None:
                raise ValueError("give either max_cache_tokens or batching_config.num_blocks, not both")
            config.num_blocks = math.ceil(max_cache_tokens / config.page_size)
        elif config.num_blocks is None and config.max_memory_percent is None:
            config.num_blocks = math.ceil(DEFAULT_CACHE_TOKENS / config.page_size)
    if block_sharing:
        return config
    refused = {
        "use_async_batching=True": config.use_async_batching is True,
        "use_cuda_graph": bool(config.use_cuda_graph),
        "compile (default_compile_level or a compile config)": bool(
            config.default_compile_level or config.varlen_compile_config or config.decode_compile_config
        ),
    }
    asked = [name for name, on in refused.items() if on]
    if asked:
        raise ValueError(
            f"{', '.join(asked)}: not supported with presses; compression runs in Python on each forward, "
            "between two synchronous steps (async batching prepares a batch before the previous one is updated)"
        )
    config.allow_block_sharing = False
    config.use_async_batching = False
    config.use_cuda_graph = False
    config.max_blocks_per_request = 0  # the flash decode fast path never shows keys to the attention function
    config.auto_switch_to_flash = False
    return config


def generate_batch(
    model: Any,
    inputs: list[list[int]],
    *,
    press: AnyPress | None = None,
    generation_config: GenerationConfig | None = None,
    batching_config: ContinuousBatchingConfig | None = None,
    max_new_tokens: int | None = None,
    max_cache_tokens: int | None = None,
    timeout: float | None = None,
) -> dict[str, GenerationOutput]:
    """Generate for every prompt with continuous batching under ``press`` (like ``model.generate_batch``).

    Returns ``{request id: GenerationOutput}`` in the order of ``inputs``. ``max_cache_tokens``
    defaults to 8192 or the longest prompt plus ``max_new_tokens``, whichever is larger.

    Raises
    ------
    RuntimeError
        If the engine stops before every request finished, a request fails, or ``timeout`` (seconds
        without a result) passes.
    """
    if not inputs:
        return {}
    gen = generation_config if generation_config is not None else model.generation_config
    new_tokens = max_new_tokens if max_new_tokens is not None else gen.max_new_tokens
    if batching_config is None and max_cache_tokens is None:
        max_cache_tokens = max(DEFAULT_CACHE_TOKENS, max(map(len, inputs)) + (new_tokens or 0))
    manager = PressBatchingManager(
        model,
        press=press,
        generation_config=gen,
        batching_config=batching_config,
        max_cache_tokens=max_cache_tokens,
    )
    results: dict[str, GenerationOutput] = {}
    with torch.no_grad(), manager:
        ids = [manager.add_request(list(prompt), max_new_tokens=max_new_tokens) for prompt in inputs]
        while len(results) < len(ids):
            result = manager.get_result(timeout=timeout if timeout is not None else 1.0)
            if result is None:
                if timeout is not None or not manager.is_running():
                    raise RuntimeError(
                        f"continuous batching stopped with {len(ids) - len(results)} of {len(ids)} requests unfinished"
                    )
                continue
            if result.error is not None:
                raise RuntimeError(f"request {result.request_id} failed: {result.error}")
            if result.is_finished():
                results[result.request_id] = result
    return {rid: results[rid] for rid in ids if rid is not None}
