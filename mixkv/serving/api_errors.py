"""OpenAI-style JSON errors for the server: every failure answers ``{"error": {...}}``.

The body has OpenAI's shape, so the ``openai`` client raises its usual ``BadRequestError`` (400),
``NotFoundError`` (404) or ``InternalServerError`` (5xx) with the message::

    {"error": {"message": "Unknown method 'nope'; choose from: full, snapkv, ...",
               "type": "invalid_request_error", "param": "press", "code": "unknown_press"}}

FastAPI's own 422 for a body that does not parse or match the schema becomes a 400 with the same
shape (:func:`install_error_handlers`).

Example
-------
>>> raise APIError(400, "budget (16) must be larger than window_size (32)", param="budget")
Traceback (most recent call last):
...
mixkv.serving.api_errors.APIError: budget (16) must be larger than window_size (32)
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["APIError", "error_body", "install_error_handlers"]

logger = logging.getLogger("mixkv.serving")

_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error"}


class APIError(Exception):
    """A request the server answers with an error status and an OpenAI-style body.

    Parameters
    ----------
    status_code
        HTTP status: 400 for a bad request, 404 for an unknown model or route, 503 when the engine
        is down, 500 for a failure of the server itself.
    message
        What went wrong and, where it helps, how to fix it.
    param
        The request field at fault (``"press"``, ``"messages.0.content"``), or None.
    code
        A short machine-readable code (``"unknown_press"``, ``"context_length_exceeded"``).
    error_type
        OpenAI's ``type``; by default ``invalid_request_error`` for 4xx and ``server_error`` for 5xx.
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPES.get(
            status_code, "invalid_request_error" if status_code < 500 else "server_error"
        )

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return error_body(self.message, self.error_type, self.param, self.code)

    def response(self) -> JSONResponse:
        """The error as a JSON response."""
        return JSONResponse(self.body(), status_code=self.status_code)


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def validation_error(errors: list[Any]) -> APIError:
    """The 400 for pydantic/FastAPI validation errors: the first error, its field and a clear message.

    Parameters
    ----------
    errors
        ``RequestValidationError.errors()`` (or ``pydantic.ValidationError.errors()``).

    Returns
    -------
    APIError
        ``invalid_json`` for a body that is not JSON, ``unknown_parameter`` for a field the API does
        not have, ``invalid_type`` or ``invalid_value`` otherwise.
    """
    if not errors:
        return APIError(400, "The request is invalid.", code="invalid_request")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return APIError(
            400,
            f"The request body is not valid JSON ({detail}); send a JSON object "
            "(Content-Type: application/json).",
            code="invalid_json",
        )
    if kind == "extra_forbidden":
        return APIError(
            400, f"Unrecognized request argument supplied: {param}.", param=param, code="unknown_parameter"
        )
    if kind == "missing":
        return APIError(
            400, f"Missing required parameter: {param}.", param=param, code="missing_required_parameter"
        )
    if not loc and kind in ("model_attributes_type", "dict_type"):
        return APIError(
            400,
            "The request body must be a JSON object, sent with Content-Type: application/json.",
            code="invalid_json",
        )
    where = f" at {param}" if param else ""
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return APIError(
        400,
        f"Invalid value{where}: {first.get('msg', 'invalid')}{more}.",
        param=param,
        code="invalid_type" if kind.endswith("_type") else "invalid_value",
    )


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` an OpenAI-style JSON body.

    :class:`APIError` keeps its status; FastAPI's request-validation 422 (malformed JSON, a wrong
    type, an unknown field) becomes a 400; Starlette's 404/405 keep their status; any other
    exception is a logged 500. A failed request never stops the server.
    """

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(list(exc.errors())).response()

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"No route {request.method} {request.url.path}; see GET /v1/models, POST /v1/chat/completions."
        return APIError(exc.status_code, message, code=f"http_{exc.status_code}").response()

    async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(
            500, f"Internal server error: {type(exc).__name__}: {exc}", code="internal_error"
        ).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
