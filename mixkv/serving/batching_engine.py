"""The server's engine: continuous batching over a paged KV cache, its outputs routed to asyncio.

:class:`BatchingEngine` owns one batching manager (a background thread running the model over a
paged cache, see ``transformers``' ``ContinuousBatchingManager``), a dispatcher thread that routes
the manager's outputs to the :class:`RequestHandle` of each request, and the page accounting the
``/v1/mixkv/cache`` endpoint reports. Everything that depends on *which* manager runs the requests
sits in one class, :class:`ManagerSeam`: today mixkv's ``PressBatchingManager``
(:mod:`mixkv.integration.continuous_batching`), which compresses each request's prompt with its press.

Example
-------
>>> engine = BatchingEngine(model, eos_token_id=tokenizer.eos_token_id,
...                         sizing=CacheSizing(max_cache_tokens=1024, page_size=32))
>>> engine.start()
>>> async def answer(ids):  # inside an event loop (the server's)
...     handle = engine.submit(ids, max_new_tokens=16, press=None, press_name="full", stream=False)
...     return await handle.final()
>>> engine.stop()
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchingEngine", "CacheSizing", "EngineError", "ManagerSeam", "PageUsage", "RequestHandle"]

logger = logging.getLogger("mixkv.serving")


class EngineError(RuntimeError):
    """A request the engine could not finish: it failed, the engine died, or it is stopping."""


@dataclass(frozen=True)
class CacheSizing:
    """How big the paged KV cache is. Explicit sizes: the engine never sizes itself from free memory.

    Attributes
    ----------
    max_cache_tokens
        KV entries (per layer) of the whole cache, shared by every request in flight; rounded up
        to whole pages. It is also the most one request can ever hold.
    page_size
        Tokens per page: the unit the cache hands out and takes back (small pages let a press
        give memory back; see ``docs/guide.md``).
    max_batch_tokens
        Tokens one forward processes (long prompts are prefilled in chunks of this size).
    """

    max_cache_tokens: int = 4096
    page_size: int = 32
    max_batch_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("max_cache_tokens", "page_size", "max_batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_cache_tokens < self.page_size:
            raise ValueError(
                f"max_cache_tokens ({self.max_cache_tokens}) must hold at least one page of {self.page_size} tokens"
            )

    @property
    def num_blocks(self) -> int:
        """Pages of the cache (each holds ``page_size`` tokens of every layer)."""
        return math.ceil(self.max_cache_tokens / self.page_size)

    def batching_config(self) -> Any:
        """transformers' ``ContinuousBatchingConfig`` for this size: no prefix sharing, synchronous
        batching (a press rewrites a request's pages, which neither tolerates)."""
        from transformers import ContinuousBatchingConfig

        return ContinuousBatchingConfig(
            num_blocks=self.num_blocks,
            page_size=self.page_size,
            max_batch_tokens=self.max_batch_tokens,
            allow_block_sharing=False,
            use_async_batching=False,
        )


@dataclass(frozen=True)
class PageUsage:
    """The paged cache's pages: how many exist, how many requests hold, which request holds how many.

    A page is ``page_size`` tokens of every layer.
    """

    page_size: int
    pages_total: int
    pages_in_use: int
    per_request: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    @property
    def pages_free(self) -> int:
        return self.pages_total - self.pages_in_use


class ManagerSeam:
    """THE SEAM: the one place that knows which batching manager runs the requests.

    It runs :class:`~mixkv.integration.continuous_batching.PressBatchingManager` (transformers'
    ``ContinuousBatchingManager`` compressing each request's prompt at the end of its prefill),
    with no default press: the server passes every request's press (or ``"full"``) explicitly. A
    model that manager cannot compress (sliding-window layers, e.g. Gemma 3) is still served with
    the full cache, and every press is refused with the reason.

    Parameters
    ----------
    model
        A causal LM (``transformers``' ``PreTrainedModel``).
    generation_config
        The greedy ``GenerationConfig`` every request starts from.
    sizing
        The cache's size.
    """

    #: Name of the engine, as ``/v1/mixkv/cache`` reports it.
    engine_name = "mixkv.integration.continuous_batching.PressBatchingManager"

    def __init__(self, model: Any, generation_config: Any, sizing: CacheSizing) -> None:
        from mixkv.integration.continuous_batching import PressBatchingManager

        self.sizing = sizing
        self.model_refusal: str | None = None
        config = sizing.batching_config()
        try:
            self.manager = PressBatchingManager(
                model, generation_config=generation_config, batching_config=config
            )
        except ValueError as exc:  # the model, not a press: serve it with the full cache only
            self.model_refusal = str(exc)
            self.manager = PressBatchingManager(
                model, generation_config=generation_config, batching_config=config, block_sharing=True
            )

    def start(self) -> None:
        """Start the manager's thread (its paged cache is built already, so its size is known)."""
        self.manager.start()

    def refusal(self, press: Any) -> str | None:
        """Why the engine cannot run ``press`` (None: it can; None is the full cache)."""
        from mixkv.integration.paged_support import check_press

        if press is None:
            return None
        if self.model_refusal is not None:
            return self.model_refusal
        try:
            check_press(press)
        except ValueError as exc:
            return str(exc)
        return None

    def add(
        self, input_ids: list[int], request_id: str, max_new_tokens: int, press: Any, stream: bool
    ) -> None:
        """Queue one request (``press`` has passed :meth:`refusal`; None runs the full cache).

        Raises
        ------
        ValueError
            When the manager refuses the request (a press, or a request that can never fit).
        """
        from mixkv.integration.continuous_batching import FULL

        self.manager.add_request(
            input_ids,
            request_id=request_id,
            max_new_tokens=max_new_tokens,
            streaming=stream,
            press=FULL if press is None else press,
        )

    def tokens_needed(self, prompt_tokens: int, max_new_tokens: int, press: Any) -> int:
        """Cache entries one request may hold at its peak: its whole prompt until its prefill ends,
        then what the press keeps of it plus the answer."""
        held = prompt_tokens if press is None else min(prompt_tokens, press.sequence_budget(prompt_tokens))
        return max(prompt_tokens, held + max_new_tokens)

    def capacity_tokens(self) -> int:
        """The most tokens one request can ever hold."""
        return int(self.manager.cache_capacity_tokens)

    def usage(self) -> PageUsage:
        """Pages in use and free, and per request."""
        if self.manager.batch_processor is None:  # stopped
            return PageUsage(self.sizing.page_size, self.sizing.num_blocks, 0)
        pages = self.manager.page_usage()
        return PageUsage(pages.page_size, pages.total, pages.in_use, dict(pages.pages), dict(pages.tokens))

    def compression(self, request_id: str) -> dict[str, Any] | None:
        """What the end of a request's prefill kept and freed, once it has happened."""
        record = self.manager.compression_info(request_id)
        if record is None:
            return None
        return {
            "prompt_tokens": record.prompt_tokens,
            "kept_tokens": record.kept_tokens,
            "freed_pages": record.freed_pages,
        }

    def fatal_error(self) -> str | None:
        """The error that stopped the manager's thread, if one did."""
        error = self.manager.background_thread_status.fatal_error
        return None if error is None else str(error)

    def next_output(self, timeout: float) -> Any:
        """The next output of any request, or None after ``timeout`` seconds."""
        output = self.manager.get_result(timeout=timeout)
        if output is None and not self.manager.is_running():
            time.sleep(timeout)  # get_result returns at once when the thread is gone
        return output

    def cancel(self, request_id: str) -> None:
        """Cancel a request: the manager drops it and its pages go back to the pool."""
        self.manager.cancel_request(request_id)

    def stop(self) -> None:
        """Stop the manager's thread (requests still running fail) and give the model its attention back."""
        self.manager.stop(block=True, timeout=10, hard_stop=True)


class RequestHandle:
    """One request in flight: its outputs arrive on the event loop that submitted it.

    Iterate it (``async for output in handle``) for the outputs as tokens arrive (each holds every
    token so far, ``generated_tokens``), or ``await handle.final()`` for the last one. A failed
    request raises :class:`EngineError`.
    """

    def __init__(
        self, request_id: str, prompt_tokens: int, max_new_tokens: int, press_name: str, budget: int | None
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.press_name = press_name
        self.budget = budget
        self.generated_tokens = 0
        self.finished = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def post(self, item: Any) -> None:
        """Hand an output (or an :class:`EngineError`) to the handle; safe from any thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> Any:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, EngineError):
            self.finished = True
            raise item
        if getattr(item, "error", None) is not None:
            self.finished = True
            raise EngineError(f"generation failed: {item.error}")
        self.generated_tokens = len(item.generated_tokens)
        self.finished = bool(item.is_finished())
        return item

    async def final(self) -> Any:
        """The request's last output (every generated token)."""
        last = None
        async for output in self:
            last = output
        return last


class BatchingEngine:
    """Continuous batching for the server: submit from the event loop, outputs come back to it.

    Parameters
    ----------
    model
        A causal LM.
    eos_token_id
        End-of-sequence id(s); generation stops there (and at ``max_new_tokens``).
    sizing
        The paged cache's size (:class:`CacheSizing`).
    pad_token_id
        Padding id of the generation config (defaults to the first EOS id).
    """

    def __init__(
        self,
        model: Any,
        *,
        eos_token_id: int | list[int] | None,
        sizing: CacheSizing | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        from transformers import GenerationConfig

        self.model = model
        self.sizing = sizing or CacheSizing()
        eos = -1 if eos_token_id is None else eos_token_id
        first_eos = eos[0] if isinstance(eos, list) and eos else eos
        self.generation_config = GenerationConfig(
            do_sample=False,
            max_new_tokens=256,
            eos_token_id=eos,
            pad_token_id=pad_token_id if pad_token_id is not None else first_eos,
        )
        self._seam: ManagerSeam | None = None
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._dispatcher: threading.Thread | None = None
        #: Requests that ended, by how: answered in full, cancelled (their client left), failed.
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}

    # ------------------------------------------------------------------ lifecycle
    @property
    def seam(self) -> ManagerSeam:
        if self._seam is None:
            raise EngineError("the engine is not started")
        return self._seam

    def start(self) -> None:
        """Build the paged cache and start the manager and the dispatcher threads (idempotent)."""
        if self._seam is not None:
            return
        seam = ManagerSeam(self.model, self.generation_config, self.sizing)
        seam.start()
        self._seam = seam
        self._stopping.clear()
        self._dispatcher = threading.Thread(target=self._dispatch, name="mixkv-serve-dispatch", daemon=True)
        self._dispatcher.start()

    def stop(self) -> None:
        """Cancel what is in flight, stop both threads; requests still waiting get an :class:`EngineError`."""
        if self._seam is None:
            return
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            self._seam.cancel(handle.request_id)
            handle.post(EngineError("the server is shutting down"))
        self._stopping.set()
        self._seam.stop()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=5)
        self._seam = None

    def fatal_error(self) -> str | None:
        """Why the engine cannot serve (not started, or its thread died), or None when it can."""
        if self._seam is None:
            return "the engine is not started"
        error = self._seam.fatal_error()
        return None if error is None else f"the batching engine stopped: {error}"

    # ------------------------------------------------------------------ requests
    def capacity_tokens(self) -> int:
        """The most tokens one request can ever hold in the cache."""
        return self.seam.capacity_tokens()

    def refusal(self, press: Any) -> str | None:
        """Why the engine cannot run ``press``, or None."""
        return self.seam.refusal(press)

    def tokens_needed(self, prompt_tokens: int, max_new_tokens: int, press: Any) -> int:
        """Cache entries one request may hold at its peak."""
        return self.seam.tokens_needed(prompt_tokens, max_new_tokens, press)

    def submit(
        self,
        input_ids: list[int],
        *,
        request_id: str,
        max_new_tokens: int,
        press: Any,
        press_name: str,
        budget: int | None = None,
        stream: bool,
    ) -> RequestHandle:
        """Queue a request; call from the event loop that will read its :class:`RequestHandle`.

        Raises
        ------
        EngineError
            When the engine cannot take requests (not started, or dead).
        """
        problem = self.fatal_error()
        if problem is not None:
            raise EngineError(problem)
        handle = RequestHandle(request_id, len(input_ids), max_new_tokens, press_name, budget)
        with self._lock:
            self._handles[request_id] = handle
        try:
            self.seam.add(list(input_ids), request_id, max_new_tokens, press, stream)
        except Exception:
            with self._lock:
                self._handles.pop(request_id, None)
            raise
        return handle

    def cancel(self, request_id: str) -> None:
        """Drop a request (its client left): no more outputs, its pages go back to the pool."""
        with self._lock:
            known = self._handles.pop(request_id, None) is not None
            self.counts["cancelled"] += known
        if known and self._seam is not None:
            self._seam.cancel(request_id)

    def usage(self) -> PageUsage:
        """The cache's pages now."""
        return self.seam.usage()

    def compression(self, request_id: str) -> dict[str, Any] | None:
        """``{"prompt_tokens", "kept_tokens", "freed_pages"}`` of a request's prefill, once it ended."""
        return self.seam.compression(request_id)

    def in_flight(self) -> list[RequestHandle]:
        """The requests submitted and not finished, oldest first."""
        with self._lock:
            return list(self._handles.values())

    # ------------------------------------------------------------------ dispatcher thread
    def _dispatch(self) -> None:
        seam = self._seam
        assert seam is not None
        while not self._stopping.is_set():
            try:
                output = seam.next_output(timeout=0.1)
            except Exception as exc:  # never let the dispatcher die silently
                logger.exception("dispatcher: reading the manager's outputs failed")
                output, error = None, EngineError(f"the engine failed: {exc}")
                self._fail_all(error)
                continue
            if output is None:
                error_text = seam.fatal_error()
                if error_text is not None:
                    self._fail_all(EngineError(f"the batching engine stopped: {error_text}"))
                continue
            with self._lock:
                handle = self._handles.get(output.request_id)
                if handle is not None and (output.is_finished() or output.error is not None):
                    del self._handles[output.request_id]
                    self.counts["failed" if output.error is not None else "finished"] += 1
            if handle is not None:  # None: cancelled, its client is gone
                handle.post(output)

    def _fail_all(self, error: EngineError) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
            self.counts["failed"] += len(handles)
        for handle in handles:
            handle.post(error)
