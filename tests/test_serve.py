"""``mixkv serve``: the OpenAI-compatible server, queried over real HTTP on 127.0.0.1.

A tiny random Llama with a word-level tokenizer and a chat template runs behind the server in a
background thread (uvicorn on a free port, stopped by the fixture); one test launches the command
itself (``python -m mixkv serve DIR``) as a subprocess. Answers are checked against
``model.generate`` (greedy) on an identical model, bad requests against OpenAI's error shape, and a
client leaving mid-answer against the cache's pages (``GET /v1/mixkv/cache``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from mixkv.serving import BatchingEngine, CacheSizing, PressChoice, ServerSettings, create_app  # noqa: E402
from tests.helpers_tiny import SIMPLE_CHAT_TEMPLATE, scale_weight_matrices, tiny_llama, word_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "tiny-llama"
CAPACITY = 2048  # tokens of the test server's cache, 128 pages of 16
SIZING = CacheSizing(max_cache_tokens=CAPACITY, page_size=16, max_batch_tokens=128)
#: The test server's default press: prompts of more than 16 tokens are compressed.
DEFAULT_PRESS = PressChoice("mixkv-snapkv", budget=16, window_size=8)
FULL = PressChoice("full")
PROMPTS = [  # 20 to 30 tokens with the chat template: the default press (budget 16) compresses each
    "The sky is blue . The grass is green . What is green ? Answer in one word",
    "The grass is green . The sun is yellow . Which one is yellow ? Only give me the answer",
    "Here we go . There and back again . Read the list and give the most common word",
    "Some special magic number is hidden within the following text . Make sure to memorize it",
    "Make sure to memorize it : 4 2 7 . What is the special magic number mentioned in the text ?",
    "Which town was founded by the river ? The river flows through the province . Answer",
]


def _model() -> Any:
    tokenizer = word_tokenizer(SIMPLE_CHAT_TEMPLATE)
    return scale_weight_matrices(tiny_llama(len(tokenizer), seed=0), 3.0), tokenizer


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a daemon thread, until :meth:`stop`."""

    def __init__(self, app: Any) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.engine: Any = None

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.socket.close()
        assert not self.thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def reference() -> Any:
    """``answer(prompt, max_tokens)``: the ids and text of ``model.generate``'s greedy answer."""
    from transformers import GenerationConfig

    model, tokenizer = _model()

    def answer(prompt: str, max_tokens: int, press: PressChoice = DEFAULT_PRESS) -> tuple[list[int], str]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        config = GenerationConfig(
            do_sample=False, max_new_tokens=max_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=0
        )
        built = press.build(context_tokens=len(ids))
        with torch.no_grad(), built(model) if built is not None else contextlib.nullcontext():
            out = model.generate(torch.tensor([ids]), generation_config=config)
        new = out[0, len(ids) :].tolist()
        return new, tokenizer.decode(new, skip_special_tokens=True)

    return answer


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    model, tokenizer = _model()
    engine = BatchingEngine(model, eos_token_id=tokenizer.eos_token_id, sizing=SIZING, pad_token_id=0)
    settings = ServerSettings(MODEL_ID, DEFAULT_PRESS, default_max_tokens=8)
    running = ServerThread(create_app(engine, tokenizer, settings)).start()
    running.engine = engine
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def _chat(client: Any, prompt: str, max_tokens: int = 12, **extra: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra or None,
    )


def _streamed(client: Any, prompt: str, max_tokens: int = 12) -> tuple[str, list[Any]]:
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def _cache(server: ServerThread) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/mixkv/cache", timeout=5)
    assert response.status_code == 200
    return dict(response.json())


def _wait_for_free_pages(server: ServerThread, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        cache = _cache(server)
        if (cache["pages_in_use"] == 0 and not cache["requests"]) or time.monotonic() > deadline:
            return cache
        time.sleep(0.05)


def test_health_models_and_cache_endpoints(server: ServerThread) -> None:
    assert httpx.get(f"{server.url}/health", timeout=5).json() == {"status": "ok"}
    assert [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=5).json()["data"]] == [MODEL_ID]
    cache = _cache(server)
    assert cache["page_size"] == 16
    assert cache["pages_total"] == CAPACITY // 16
    assert cache["capacity_tokens"] == CAPACITY
    assert cache["pages_free"] + cache["pages_in_use"] == cache["pages_total"]
    assert cache["default_press"] == {"press": "mixkv-snapkv", "budget": 16, "window_size": 8}
    assert cache["engine"].endswith("PressBatchingManager")


def test_chat_completion_equals_generate(client: Any, reference: Any) -> None:
    response = _chat(client, PROMPTS[0], max_tokens=12)
    ids, text = reference(PROMPTS[0], 12)
    assert response.choices[0].message.content == text
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == ("stop" if len(ids) < 12 else "length")
    assert response.usage.completion_tokens == len(ids)
    assert response.usage.prompt_tokens > 10
    assert response.model == MODEL_ID
    report = response.model_extra["mixkv"]
    assert (report["press"], report["budget"]) == ("mixkv-snapkv", 16)
    assert report["compression"]["prompt_tokens"] == response.usage.prompt_tokens
    assert report["compression"]["kept_tokens"] == 16


def test_streamed_chat_completion_equals_generate(client: Any, server: ServerThread, reference: Any) -> None:
    text, chunks = _streamed(client, PROMPTS[1], max_tokens=12)
    ids, expected = reference(PROMPTS[1], 12)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(ids)
    assert len({c.id for c in chunks}) == 1
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": PROMPTS[1]}],
        "max_tokens": 4,
        "stream": True,
    }
    raw = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e.removeprefix("data: "))["object"] == "chat.completion.chunk" for e in events[:-1])


def test_several_clients_at_once(client: Any, server: ServerThread, reference: Any) -> None:
    def ask(i: int) -> str:
        if i % 2:
            return _streamed(client, PROMPTS[i], max_tokens=10)[0]
        return str(_chat(client, PROMPTS[i], max_tokens=10).choices[0].message.content)

    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        answers = list(pool.map(ask, range(len(PROMPTS))))
    assert answers == [reference(p, 10)[1] for p in PROMPTS]
    assert _wait_for_free_pages(server)["pages_in_use"] == 0


def _long_prompt() -> str:
    return " ".join(["The sky is blue ."] * (CAPACITY // 4 + 10))


BAD_REQUESTS = {
    "unknown press": ({"press": "nope", "budget": 64}, 400, "press", "unknown_press"),
    "budget not above the window": (
        {"press": "snapkv", "budget": 8, "window_size": 8},
        400,
        "budget",
        "invalid_budget",
    ),
    "press the engine refuses": (
        {"press": "kvpress-snapkv", "budget": 64},
        400,
        "press",
        "press_not_supported",
    ),
    "prompt longer than the cache": (
        {"messages": [{"role": "user", "content": _long_prompt()}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    "answer longer than the cache": ({"max_tokens": CAPACITY}, 400, "max_tokens", "context_length_exceeded"),
    "sampling": ({"temperature": 0.7, "top_p": 0.5}, 400, "temperature", "unsupported_parameter"),
    "unknown field": ({"frobnicate": 1}, 400, "frobnicate", "unknown_parameter"),
    "wrong type": ({"max_tokens": "many"}, 400, "max_tokens", None),
    "no messages": ({"messages": []}, 400, "messages", None),
    "image content": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages.0.content.0",
        "unsupported_content",
    ),
    "unknown model": ({"model": "gpt-9"}, 404, "model", "model_not_found"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_json_error_and_the_server_keeps_serving(
    case: str, client: Any, server: ServerThread
) -> None:
    fields, status, param, code = BAD_REQUESTS[case]
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": 4,
    } | fields
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    if case == "prompt longer than the cache":
        assert str(CAPACITY) in error["message"]
    assert _chat(client, PROMPTS[2], max_tokens=3).choices[0].message.content is not None


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"messages": [', b"[1, 2]", b""],
    ids=["garbage", "truncated", "list", "empty"],
)
def test_malformed_json_is_a_400(content: bytes, client: Any, server: ServerThread) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert _chat(client, PROMPTS[3], max_tokens=3).choices[0].message.content is not None


def test_press_per_request(client: Any, server: ServerThread, reference: Any) -> None:
    """A request's ``press``/``budget``/``window_size`` (``extra_body``) override the server's; the
    answer equals ``with press(model): model.generate(...)`` and the prefill frees pages."""
    long_prompt = " ".join(PROMPTS)  # 70 tokens or so: 5 pages of 16 before compression
    for choice in (PressChoice("snapkv", budget=24, window_size=4), PressChoice("knorm", 20, 8), FULL):
        extra = {"press": choice.name} if choice.name == "full" else choice.describe()
        response = _chat(client, long_prompt, max_tokens=12, **extra)
        report = response.model_extra["mixkv"]
        assert {k: report[k] for k in ("press", "budget", "window_size")} == choice.describe()
        assert response.choices[0].message.content == reference(long_prompt, 12, press=choice)[1]
        compression = report["compression"]
        assert compression["prompt_tokens"] == response.usage.prompt_tokens
        if choice.name == "full":
            assert compression["kept_tokens"] == compression["prompt_tokens"]
        else:
            assert compression["kept_tokens"] == choice.budget
            assert compression["freed_pages"] >= 2
    assert (
        _chat(client, long_prompt, max_tokens=12, budget=40).model_extra["mixkv"]["press"] == "mixkv-snapkv"
    )
    assert _wait_for_free_pages(server)["pages_in_use"] == 0


def test_openai_client_raises_bad_request_with_the_message(client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="Unknown press 'nope'"):
        _chat(client, PROMPTS[0], press="nope")
    with pytest.raises(openai.BadRequestError, match="must be larger than window_size"):
        _chat(client, PROMPTS[0], press="mixkv-snapkv", budget=32, window_size=32)


def test_unknown_route_is_a_json_404(server: ServerThread) -> None:
    response = httpx.get(f"{server.url}/v1/nothing", timeout=5)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_streaming_client_that_disconnects_frees_its_pages(server: ServerThread) -> None:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": PROMPTS[4]}], "stream": True}
    body["max_tokens"] = CAPACITY - 100  # seconds of decoding: still running when the client leaves
    held, cancelled = 0, _cache(server)["requests_ended"]["cancelled"]
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i == 20:
                cache = _cache(server)
                held = sum(request["pages"] for request in cache["requests"])
                break
    assert held > 0
    cache = _wait_for_free_pages(server)
    assert cache["pages_in_use"] == 0 and cache["requests"] == []
    assert cache["requests_ended"]["cancelled"] == cancelled + 1  # not just answered in full meanwhile


def test_waiting_client_that_disconnects_frees_its_pages(server: ServerThread) -> None:
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": PROMPTS[5]}],
        "max_tokens": CAPACITY - 100,
    }
    cancelled = _cache(server)["requests_ended"]["cancelled"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=0.3)
    cache = _wait_for_free_pages(server)
    assert cache["pages_in_use"] == 0 and cache["requests"] == []
    assert cache["requests_ended"]["cancelled"] == cancelled + 1


def test_serve_command_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from mixkv.commands.serve import main

    for argv, message in [
        (["x", "--press", "nope", "--budget", "64"], "Unknown press 'nope'"),
        (["x", "--press", "snapkv"], "needs a budget"),
        (["x", "--press", "snapkv", "--budget", "16"], "must be larger than window_size"),
        (["x", "--budget", "16", "--window-size", "16"], "must be larger than --window-size"),
        (["x", "--page-size", "64", "--max-cache-tokens", "32"], "at least one page"),
        (["x", "--port", "70000"], "at most 65535"),
        (["/nonexistent/model/dir"], "MODEL:"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model and tokenizer saved as a model directory (``tiny``)."""
    directory = tmp_path_factory.mktemp("serve") / "tiny"
    model, tokenizer = _model()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_serve_command_refuses_a_press_the_engine_cannot_run(
    tiny_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mixkv.commands.serve import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                str(tiny_dir),
                "--press",
                "adakv",
                "--budget",
                "64",
                "--max-cache-tokens",
                "64",
                "--page-size",
                "16",
            ]
        )
    assert exit_info.value.code == 2
    assert "--press adakv: adakv is not supported in continuous batching" in capsys.readouterr().err


def test_mixkv_serve_command_in_a_subprocess(tiny_dir: Path, reference: Any) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "mixkv", "serve", str(tiny_dir), "--port", str(port)]
    command += ["--press", "mixkv-snapkv", "--budget", "16", "--window-size", "8"]  # DEFAULT_PRESS
    command += ["--max-cache-tokens", "512", "--page-size", "16", "--max-batch-tokens", "64"]
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "mixkv serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30
        )
        response = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12
        )
        assert response.choices[0].message.content == reference(PROMPTS[0], 12)[1]
        assert (
            httpx.get(f"http://127.0.0.1:{port}/v1/mixkv/cache", timeout=5).json()["capacity_tokens"] == 512
        )
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert f"http://127.0.0.1:{port}/v1" in output
    assert "32 pages x 16 tokens = 512 tokens" in output
    assert "default press: mixkv-snapkv, budget 16, window 8" in output
