"""The OpenAI-compatible FastAPI app over the batching engine (``mixkv serve``).

Routes: ``POST /v1/chat/completions`` (streamed or not), ``GET /v1/models``, ``GET /health`` and
mixkv's ``GET /v1/mixkv/cache`` (the paged cache's pages, the requests in flight, the default press).
Each request may choose its press with the extra fields ``press``/``budget``/``window_size``; every
bad request gets a 4xx with OpenAI's error body (:mod:`mixkv.serving.api_errors`) and the server
keeps serving the others. A client that leaves before its answer is complete has its request
cancelled, which gives its pages back to the pool.

Example
-------
>>> from mixkv.model_loading import load_model
>>> model, tokenizer = load_model("smollm2")
>>> engine = BatchingEngine(model, eos_token_id=tokenizer.eos_token_id, sizing=CacheSizing(1024, 32, 256))
>>> app = create_app(engine, tokenizer, ServerSettings("smollm2", PressChoice("full", budget=128)))
>>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mixkv.serving.api_errors import APIError, install_error_handlers, logger
from mixkv.serving.batching_engine import BatchingEngine, EngineError, RequestHandle
from mixkv.serving.openai_format import (
    ChatCompletionRequest,
    TextStream,
    chat_chunk,
    chat_completion,
    finish_reason,
    now,
    sse,
    usage,
)
from mixkv.serving.press_choice import PressChoice, PressError

__all__ = ["ServerSettings", "create_app"]


@dataclass(frozen=True)
class ServerSettings:
    """What the server serves.

    Attributes
    ----------
    model_id
        The model's name in ``/v1/models``; a request's ``model`` must be it (or one of ``aliases``).
    default_press
        The press of requests that name none (``PressChoice("full")``: the full cache); its budget
        and window also fill in a request that names a press without them.
    default_max_tokens
        Answer length of requests without ``max_tokens`` (less when the cache cannot hold it).
    aliases
        Other names accepted in a request's ``model`` (e.g. the model's directory as given).
    """

    model_id: str
    default_press: PressChoice = field(default_factory=PressChoice)
    default_max_tokens: int = 256
    aliases: tuple[str, ...] = ()


def create_app(engine: BatchingEngine, tokenizer: Any, settings: ServerSettings) -> FastAPI:
    """The FastAPI app; it starts ``engine`` on startup (if needed) and stops it on shutdown.

    Parameters
    ----------
    engine
        The batching engine (:class:`~mixkv.serving.batching_engine.BatchingEngine`).
    tokenizer
        The model's tokenizer; it needs a chat template.
    settings
        Model name, default press, default answer length (:class:`ServerSettings`).

    Returns
    -------
    FastAPI
        The app, to run with uvicorn.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(
        title="mixkv serve",
        description="OpenAI-compatible chat completions with KV-cache presses",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    eos_ids = _eos_ids(engine.generation_config.eos_token_id)

    @app.get("/health")
    async def health() -> JSONResponse:
        problem = engine.fatal_error()
        if problem is not None:
            raise APIError(503, problem, code="engine_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": settings.model_id, "object": "model", "created": 0, "owned_by": "mixkv"}],
        }

    @app.get("/v1/mixkv/cache")
    async def cache() -> dict[str, Any]:
        pages = engine.usage()
        requests = [
            {
                "id": handle.request_id,
                "press": handle.press_name,
                "budget": handle.budget,
                "prompt_tokens": handle.prompt_tokens,
                "generated_tokens": handle.generated_tokens,
                "max_tokens": handle.max_new_tokens,
                "pages": pages.pages.get(handle.request_id, 0),
                "cached_tokens": pages.tokens.get(handle.request_id, 0),
                "compression": engine.compression(handle.request_id),
            }
            for handle in engine.in_flight()
        ]
        return {
            "engine": engine.seam.engine_name,
            "page_size": pages.page_size,
            "pages_total": pages.total,
            "pages_in_use": pages.in_use,
            "pages_free": pages.free,
            "capacity_tokens": engine.capacity_tokens(),
            "max_batch_tokens": engine.sizing.max_batch_tokens,
            "default_press": settings.default_press.describe(),
            "requests": requests,
            "requests_ended": dict(engine.counts),
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if body.model is not None and body.model not in (settings.model_id, *settings.aliases):
            raise APIError(
                404,
                f"The model {body.model!r} does not exist on this server; it serves {settings.model_id!r}.",
                param="model",
                code="model_not_found",
            )
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(
                400,
                f"Unsupported parameter(s): {', '.join(unsupported)}. This server decodes greedily (temperature "
                "0 or absent), one answer per request, without stop strings, logprobs, penalties or tools.",
                param=unsupported[0].split("=")[0],
                code="unsupported_parameter",
            )
        input_ids = _prompt_ids(tokenizer, body)
        choice = settings.default_press.override(
            press=body.press, budget=body.budget, window_size=body.window_size
        )
        try:
            press = choice.build(context_tokens=len(input_ids))
        except PressError as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from exc
        refusal = engine.refusal(press)
        if refusal is not None:
            raise APIError(
                400,
                f"This server's engine refuses press {choice.name!r}: {refusal}.",
                param="press",
                code="press_not_supported",
            )
        max_new = _max_new_tokens(engine, body, len(input_ids), press, settings.default_max_tokens)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        try:
            handle = engine.submit(
                input_ids,
                request_id=completion_id,
                max_new_tokens=max_new,
                press=press,
                press_name=choice.name,
                budget=choice.describe()["budget"],
                stream=body.stream,
            )
        except EngineError as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from exc
        except ValueError as exc:  # the manager's own refusal (its checks match ours; kept as a net)
            raise APIError(400, str(exc), param="press", code="request_refused") from exc
        meta: dict[str, Any] = {"completion_id": completion_id, "model": settings.model_id, "created": now()}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = _stream_events(engine, handle, TextStream(tokenizer), eos_ids, meta, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        output = await _final_unless_client_leaves(engine, handle, request)
        if output is None:
            return Response(status_code=499)  # the client is gone: nobody reads this
        generated = list(output.generated_tokens)
        return JSONResponse(
            chat_completion(
                **meta,
                text=TextStream(tokenizer).text(generated),
                reason=finish_reason(generated, eos_ids),
                prompt_tokens=len(input_ids),
                completion_tokens=len(generated),
                press=choice.describe() | {"compression": engine.compression(completion_id)},
            )
        )

    return app


def _eos_ids(eos: Any) -> set[int]:
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos]) if int(e) >= 0}


def _prompt_ids(tokenizer: Any, body: ChatCompletionRequest) -> list[int]:
    """The chat template's token ids for the request's messages (400 when they do not fit it)."""
    try:
        chat = body.chat()
    except ValueError as exc:
        param = str(exc).split(":", 1)[0]
        raise APIError(400, str(exc), param=param, code="unsupported_content") from exc
    try:
        encoded = tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    except Exception as exc:  # the template's own checks (roles, order) raise jinja or value errors
        raise APIError(
            400,
            f"The messages do not fit the model's chat template: {exc}",
            param="messages",
            code="invalid_messages",
        ) from exc
    return [int(i) for i in encoded["input_ids"]]


def _max_new_tokens(
    engine: BatchingEngine, body: ChatCompletionRequest, prompt_tokens: int, press: Any, default: int
) -> int:
    """The answer's length limit, checked against what the cache can ever hold for one request."""
    capacity = engine.capacity_tokens()
    if engine.tokens_needed(prompt_tokens, 1, press) > capacity:
        raise APIError(
            400,
            f"The prompt has {prompt_tokens} tokens, more than this server's KV cache can ever hold for one request "
            f"({capacity} tokens, with at least one answer token; mixkv serve --max-cache-tokens sets it). "
            "Shorten the messages.",
            param="messages",
            code="context_length_exceeded",
        )
    requested = body.requested_max_tokens()
    if requested is None:
        return _most_answer_tokens(engine, prompt_tokens, press, default, capacity)
    needed = engine.tokens_needed(prompt_tokens, requested, press)
    if needed > capacity:
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        room = _most_answer_tokens(engine, prompt_tokens, press, requested, capacity)
        raise APIError(
            400,
            f"This server's KV cache holds at most {capacity} tokens per request; the request needs {needed} "
            f"({prompt_tokens} in the messages, up to {requested} in the answer). Set {param} to {room} or less.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def _most_answer_tokens(
    engine: BatchingEngine, prompt_tokens: int, press: Any, upper: int, capacity: int
) -> int:
    """The longest answer (at most ``upper`` tokens) whose request fits the cache (at least 1)."""
    low, high = 1, upper
    while low < high:
        middle = (low + high + 1) // 2
        if engine.tokens_needed(prompt_tokens, middle, press) <= capacity:
            low = middle
        else:
            high = middle - 1
    return low


async def _final_unless_client_leaves(engine: BatchingEngine, handle: RequestHandle, request: Request) -> Any:
    """The request's last output, or None (request cancelled) when its client disconnects first."""
    task = asyncio.ensure_future(handle.final())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                try:
                    return task.result()
                except EngineError as exc:
                    dead = engine.fatal_error() is not None
                    raise APIError(503 if dead else 500, str(exc), code="generation_failed") from exc
            if await request.is_disconnected():
                logger.info("client left before %s finished: cancelled", handle.request_id)
                return None
    finally:
        if not task.done():
            task.cancel()
            engine.cancel(handle.request_id)


async def _stream_events(
    engine: BatchingEngine,
    handle: RequestHandle,
    detok: TextStream,
    eos_ids: set[int],
    meta: dict[str, Any],
    include_usage: bool,
) -> AsyncIterator[str]:
    """The SSE stream: a role chunk, a chunk per piece of new text, the finish chunk, usage, ``[DONE]``.

    If the client disconnects, the response's task is cancelled and ``finally`` cancels the
    request, so the engine frees its pages.
    """
    generated: list[int] = []
    try:
        yield sse(chat_chunk(**meta, delta={"role": "assistant", "content": ""}))
        async for output in handle:
            generated = list(output.generated_tokens)
            text = detok.push(generated, final=handle.finished)
            if text:
                yield sse(chat_chunk(**meta, delta={"content": text}))
        yield sse(chat_chunk(**meta, reason=finish_reason(generated, eos_ids)))
        if include_usage:
            yield sse(chat_chunk(**meta, usage_counts=usage(handle.prompt_tokens, len(generated))))
    except EngineError as exc:
        yield sse(
            {
                "error": {
                    "message": str(exc),
                    "type": "server_error",
                    "param": None,
                    "code": "generation_failed",
                }
            }
        )
    finally:
        if not handle.finished:
            engine.cancel(handle.request_id)
    yield sse("[DONE]")
