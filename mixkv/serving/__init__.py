"""``mixkv serve``'s server: OpenAI-compatible chat completions over continuous batching with presses.

:mod:`~mixkv.serving.server_app` holds the FastAPI app, :mod:`~mixkv.serving.batching_engine` the
engine (a batching manager over a paged KV cache, behind the one seam of
:mod:`~mixkv.serving.manager_seam`), :mod:`~mixkv.serving.press_choice`
the per-request press, :mod:`~mixkv.serving.openai_format` OpenAI's request and response formats and
:mod:`~mixkv.serving.api_errors` the error bodies. Needs the ``serve`` extra (fastapi, uvicorn).

Example
-------
>>> from mixkv.serving import BatchingEngine, CacheSizing, PressChoice, ServerSettings, create_app
>>> engine = BatchingEngine(model, eos_token_id=tokenizer.eos_token_id, sizing=CacheSizing(2048, 32, 256))
>>> app = create_app(engine, tokenizer, ServerSettings("smollm2", PressChoice("mixkv-snapkv", budget=128)))
"""

from __future__ import annotations

from mixkv.serving.batching_engine import BatchingEngine, EngineError
from mixkv.serving.manager_seam import CacheSizing
from mixkv.serving.press_choice import PressChoice, PressError
from mixkv.serving.server_app import ServerSettings, create_app

__all__ = [
    "BatchingEngine",
    "CacheSizing",
    "EngineError",
    "PressChoice",
    "PressError",
    "ServerSettings",
    "create_app",
]
