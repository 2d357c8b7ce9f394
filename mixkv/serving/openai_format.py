"""OpenAI's chat-completions format: the request schema, the responses, the stream's chunks.

The request model forbids fields the API does not have (as OpenAI does: "Unrecognized request
argument supplied"), and :meth:`ChatCompletionRequest.unsupported` names the fields whose values this
server cannot honour (it decodes greedily; no tools, no stop strings). mixkv's own fields
``press``, ``budget`` and ``window_size`` choose a request's press; the ``openai`` client sends them
with ``extra_body=``.

Example
-------
>>> req = ChatCompletionRequest.model_validate(
...     {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0.7, "press": "snapkv"})
>>> req.unsupported()
['temperature=0.7']
>>> sse({"id": "x"})
'data: {"id": "x"}\\n\\n'
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "TextStream",
    "chat_chunk",
    "chat_completion",
    "finish_reason",
    "now",
    "sse",
    "usage",
]


class ChatMessage(BaseModel):
    """One message: a role and text (a string, or text parts ``[{"type": "text", "text": ...}]``).

    Other fields OpenAI's messages may carry (``name``, ``refusal``, ``tool_calls``) are accepted and
    left out of the prompt.
    """

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self, index: int) -> str:
        """The message's text; ``ValueError("messages.I.content...: ...")`` for non-text parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        pieces = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"messages.{index}.content.{j}: only text parts ({{'type': 'text', 'text': ...}}) are "
                    f"supported, got type {part.get('type')!r}"
                )
            pieces.append(part["text"])
        return "".join(pieces)


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions``."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # mixkv's extension: the request's press (defaults: the server's --press/--budget/--window-size)
    press: str | None = None
    budget: int | None = Field(default=None, ge=1)
    window_size: int | None = Field(default=None, ge=1)

    def unsupported(self) -> list[str]:
        """``name=value`` for every field set to something this server does not do (greedy only)."""
        defaults: dict[str, tuple[Any, ...]] = {
            "temperature": (None, 0),
            "top_p": (None, 1),
            "n": (None, 1),
            "presence_penalty": (None, 0),
            "frequency_penalty": (None, 0),
            "logprobs": (None, False),
            "top_logprobs": (None, 0),
            "tool_choice": (None, "none"),
        }
        found = [
            f"{name}={getattr(self, name)!r}"
            for name, ok in defaults.items()
            if getattr(self, name) not in ok
        ]
        for name in ("stop", "logit_bias", "tools"):
            if getattr(self, name):
                found.append(f"{name}={getattr(self, name)!r}")
        if self.response_format is not None and self.response_format.get("type") != "text":
            found.append(f"response_format={self.response_format!r}")
        return found

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name) or ``max_tokens`` (the older one)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """The messages as the tokenizer's chat template takes them."""
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]


class TextStream:
    """Incremental detokenization: the new text each time the generated tokens grow.

    Text Generation Inference's scheme: only a short tail of the answer is decoded at each step, from
    a token before the last piece sent (so a word's leading space or a multi-byte character split
    across tokens comes out right), and text ending in an incomplete UTF-8 character waits for the
    next token. The pieces join to :meth:`text` of all the tokens.

    Parameters
    ----------
    tokenizer
        The model's tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.prefix_offset = 0
        self.read_offset = 0

    def text(self, token_ids: list[int]) -> str:
        """The answer's text (special tokens left out)."""
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def push(self, token_ids: list[int], final: bool = False) -> str:
        """The text not sent yet, given all the tokens generated so far."""
        prefix = self.text(token_ids[self.prefix_offset : self.read_offset])
        text = self.text(token_ids[self.prefix_offset :])
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return text[len(prefix) :]


def finish_reason(generated: list[int], eos_token_ids: set[int]) -> str:
    """``"stop"`` when the answer ended on an end-of-sequence token, else ``"length"``."""
    return "stop" if generated and generated[-1] in eos_token_ids else "length"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(
    *,
    completion_id: str,
    model: str,
    created: int,
    text: str,
    reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    press: dict[str, Any],
) -> dict[str, Any]:
    """A non-streamed answer (``object: chat.completion``), with mixkv's ``press`` report."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
        "mixkv": press,
    }


def chat_chunk(
    *,
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None = None,
    reason: str | None = None,
    usage_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One streamed chunk (``object: chat.completion.chunk``); with ``usage_counts`` and no delta,
    the last chunk of ``stream_options.include_usage`` (its ``choices`` is empty)."""
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
    }
    if delta is not None or reason is not None:
        chunk["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": reason, "logprobs": None}]
    if usage_counts is not None:
        chunk["usage"] = usage_counts
    return chunk


def sse(payload: dict[str, Any] | str) -> str:
    """A server-sent event: ``data: <json>`` and a blank line (``data: [DONE]`` for the string ``"[DONE]"``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def now() -> int:
    """Seconds since the epoch, OpenAI's ``created``."""
    return int(time.time())
