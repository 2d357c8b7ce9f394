"""The server's engine: continuous batching over a paged KV cache, its outputs routed to asyncio.

:class:`BatchingEngine` owns one batching manager (a background thread running the model over a
paged cache, see ``transformers``' ``ContinuousBatchingManager``), a dispatcher thread that routes
the manager's outputs to the :class:`RequestHandle` of each request, and the page accounting the
``/v1/mixkv/cache`` endpoint reports. Everything that depends on *which* manager runs the requests
sits in one class, :class:`~mixkv.serving.manager_seam.ManagerSeam`: today mixkv's ``PressBatchingManager``
(:mod:`mixkv.integration.continuous_batching`), which compresses each request's prompt with its press.

Example
-------
>>> engine = BatchingEngine(model, eos_token_id=tokenizer.eos_token_id,
...                         sizing=CacheSizing(max_cache_tokens=1024, page_size=32))
>>> engine.start()
>>> async def answer(ids):  # inside an event loop (the server's)
...     handle = engine.submit(ids, request_id="r1", max_new_tokens=16, press=None, press_name="full",
...                            stream=False)
...     return await handle.final()
>>> engine.stop()
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from mixkv.integration.continuous_batching import PageUsage
from mixkv.serving.manager_seam import CacheSizing, ManagerSeam

__all__ = ["BatchingEngine", "EngineError", "RequestHandle"]

logger = logging.getLogger("mixkv.serving")


class EngineError(RuntimeError):
    """A request the engine could not finish: it failed, the engine died, or it is stopping."""


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
