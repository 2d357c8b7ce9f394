"""``mixkv serve``: an OpenAI-compatible chat server with a KV-cache press (extra ``serve``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Serve MODEL over HTTP with OpenAI's chat-completions API (POST /v1/chat/completions, streamed or not;
GET /v1/models; GET /health) and mixkv's GET /v1/mixkv/cache (pages total, free, per request). Requests
run together over one paged KV cache (continuous batching); each may choose its press with the extra
body fields "press", "budget" and "window_size" (openai client: extra_body={...}), defaulting to
--press/--budget/--window-size. Decoding is greedy. On CPU keep the cache small: --max-cache-tokens
sizes it explicitly (the cache is allocated up front)."""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``mixkv serve`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="mixkv serve", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model", metavar="MODEL", help="smollm2, qwen2.5-coder-0.5b, gemma3-270m or a model directory"
    )
    parser.add_argument(
        "--press", default="full", help="default press of the requests (`mixkv presses`); full: none"
    )
    parser.add_argument(
        "--budget", type=_positive, default=None, help="default budget: kept tokens per KV head"
    )
    parser.add_argument(
        "--window-size", type=_positive, default=32, help="the presses' observation window (32)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="port to listen on (8000)")
    parser.add_argument(
        "--max-cache-tokens",
        type=_positive,
        default=4096,
        help="KV cache size in tokens, shared by all requests; also the most one request can hold (4096)",
    )
    parser.add_argument("--page-size", type=_positive, default=32, help="tokens per cache page (32)")
    parser.add_argument(
        "--max-batch-tokens",
        type=_positive,
        default=256,
        help="tokens per forward; longer prompts are chunked (256)",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=_positive,
        default=256,
        help="answer length when a request sets none (256)",
    )
    parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    parser.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``mixkv serve MODEL [--press NAME --budget N] [--host H --port P] [cache sizing]``: run the server."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import uvicorn

        from mixkv.serving import (
            BatchingEngine,
            CacheSizing,
            PressChoice,
            PressError,
            ServerSettings,
            create_app,
        )
    except ImportError as exc:
        parser.exit(2, f"mixkv serve: {exc}; install the serve extra: pip install 'mixkv[serve]'\n")

    from mixkv.model_loading import is_vlm_config, load_model, parse_dtype

    try:
        sizing = CacheSizing(args.max_cache_tokens, args.page_size, args.max_batch_tokens)
        dtype = parse_dtype(args.dtype)
    except ValueError as exc:
        parser.error(str(exc))
    choice = PressChoice(args.press, args.budget, args.window_size)
    try:
        press = choice.build(context_tokens=args.max_cache_tokens)
    except PressError as exc:
        flag = {"press": "--press", "budget": "--budget", "window_size": "--window-size"}[exc.param]
        parser.error(f"{flag}: {exc}")
    if choice.budget is not None and choice.budget <= choice.window_size:
        parser.error(f"--budget ({choice.budget}) must be larger than --window-size ({choice.window_size})")

    try:
        model, tokenizer = load_model(args.model, dtype=dtype)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"MODEL: {exc}")
    if is_vlm_config(model.config):
        parser.error(f"MODEL: {args.model} is a vision-language model; mixkv serve serves text models")
    if getattr(tokenizer, "chat_template", None) is None:
        parser.error(f"MODEL: {args.model}'s tokenizer has no chat template; chat completions need one")

    engine = BatchingEngine(
        model, eos_token_id=_eos(model, tokenizer), sizing=sizing, pad_token_id=tokenizer.pad_token_id
    )
    try:
        engine.start()  # builds the paged cache now: its size is known, and the press can be checked
    except (RuntimeError, ValueError) as exc:  # e.g. a transformers release without the engine mixkv needs
        parser.exit(2, f"mixkv serve: the batching engine cannot start: {exc}\n")
    refusal = engine.refusal(press)
    if refusal is not None:
        engine.stop()
        parser.error(f"--press {args.press}: {refusal}")
    settings = ServerSettings(
        model_id=_model_id(args.model),
        default_press=choice,
        default_max_tokens=args.default_max_tokens,
        aliases=(args.model,),
    )
    app = create_app(engine, tokenizer, settings)
    pages = engine.usage()
    press_text = (
        "full cache"
        if press is None
        else f"{choice.name}, budget {choice.budget}, window {choice.window_size}"
    )
    print(
        f"mixkv serve: {settings.model_id} at http://{args.host}:{args.port}/v1 (OpenAI API; "
        f"GET /v1/mixkv/cache for the pages)\n"
        f"  KV cache: {pages.total} pages x {pages.page_size} tokens = {engine.capacity_tokens()} tokens, "
        f"{args.max_batch_tokens} tokens per forward; default press: {press_text}",
        flush=True,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()  # idempotent: the app's shutdown stops it too, but not when the port was taken
    return 0


def _eos(model: Any, tokenizer: Any) -> Any:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return eos if eos is not None else tokenizer.eos_token_id


def _model_id(model: str) -> str:
    path = Path(model).expanduser()
    return path.name if path.is_dir() else model
