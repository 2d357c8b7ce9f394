"""Presses inside transformers' continuous batching (mixkv.integration.continuous_batching).

Every request of a continuous-batching run with a press generates what it generates alone under
``with press(model): model.generate(...)`` (requests arriving at different times, long prompts
prefilled in chunks); the pages in use are, after every step, exactly what the live requests hold;
refused presses and models are refused by name.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest
import torch

from mixkv.integration.paged_support import engine_unavailable_reason

_UNAVAILABLE = engine_unavailable_reason()
if _UNAVAILABLE is not None:
    pytest.skip(
        f"transformers' continuous-batching engine is unavailable: {_UNAVAILABLE}", allow_module_level=True
    )

from transformers import ContinuousBatchingConfig, GenerationConfig  # noqa: E402

import mixkv  # noqa: E402
from mixkv.integration.continuous_batching import FULL, PressBatchingManager, generate_batch  # noqa: E402
from tests.helpers_tiny import press_test_llama, random_llama  # noqa: E402

NEW_TOKENS = 8
WINDOW = 8
BUDGET = 32
PAGE = 8
GEN = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1)
# Prompts up to 150 tokens; 48 batch tokens make the engine chunk the longer ones (and share a
# batch's budget between several requests, so chunks have all sorts of lengths).
LENGTHS = (12, 150, 40, 77, 31, 96, 50, 130, 64, 20, 110, 45, 140, 33, 88, 57, 120, 26)


def _config(max_batch_tokens: int = 48, num_blocks: int = 160) -> ContinuousBatchingConfig:
    return ContinuousBatchingConfig(page_size=PAGE, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens)


@pytest.fixture(scope="module")
def model() -> Any:
    return press_test_llama()


def _prompts(lengths: tuple[int, ...] = LENGTHS, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=generator).tolist() for n in lengths]


def _alone(model: Any, press: Any, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    options = {"attention_mask": torch.ones_like(ids), "max_new_tokens": NEW_TOKENS, "do_sample": False}
    if press is None:
        out = model.generate(ids, **options)
    else:
        with press(model):
            out = model.generate(ids, **options)
    return out[0, len(prompt) :].tolist()


class Steps:
    """Counts engine steps (a step callback) and lets the test wait for some."""

    def __init__(self) -> None:
        self.count = 0
        self.condition = threading.Condition()

    def __call__(self, manager: PressBatchingManager) -> None:
        with self.condition:
            self.count += 1
            self.condition.notify_all()

    def wait(self, more: int, timeout: float = 10.0) -> None:
        with self.condition:
            target = self.count + more
            assert self.condition.wait_for(lambda: self.count >= target, timeout), (
                "the engine made no progress"
            )


def _run(
    model: Any,
    waves: list[list[list[int]]],
    press: Any = None,
    presses: list[Any] | None = None,
    callbacks: tuple[Any, ...] = (),
    config: ContinuousBatchingConfig | None = None,
) -> tuple[list[list[int]], PressBatchingManager]:
    """Generate for every prompt, a wave at a time (the next wave after a few engine steps)."""
    steps = Steps()
    manager = PressBatchingManager(
        model, press=press, generation_config=GEN, batching_config=config or _config()
    )
    manager.add_step_callback(steps)
    for callback in callbacks:
        manager.add_step_callback(callback)
    ids: list[str] = []
    results: dict[str, Any] = {}
    with manager:
        for number, wave in enumerate(waves):
            if number:
                steps.wait(3)
            for prompt in wave:
                own = presses[len(ids)] if presses is not None else None
                rid = manager.add_request(prompt, max_new_tokens=NEW_TOKENS, press=own)
                assert rid is not None
                ids.append(rid)
        deadline = time.monotonic() + 60
        while len(results) < len(ids):
            assert time.monotonic() < deadline, "continuous batching did not finish"
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                assert result.error is None, result.error
                results[result.request_id] = result
    return [results[rid].generated_tokens for rid in ids], manager


def _waves(prompts: list[list[int]]) -> list[list[list[int]]]:
    return [prompts[:6], prompts[6:12], prompts[12:]]


PRESSES = {
    "snapkv": lambda: mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW),
    "mixkv-snapkv": lambda: mixkv.MixKVPress(budget=BUDGET, window_size=WINDOW),
    "keydiff": lambda: mixkv.KeyDiffPress(budget=BUDGET, window_size=WINDOW),
    "streamingllm": lambda: mixkv.StreamingLLMPress(budget=BUDGET, window_size=WINDOW),
    "tova": lambda: mixkv.TOVAPress(budget=BUDGET, window_size=WINDOW),
    "mixkv-tova": lambda: mixkv.MixKVTOVAPress(budget=BUDGET, window_size=WINDOW),
    "lookm": lambda: mixkv.LookMPress(budget=BUDGET, window_size=WINDOW),  # merges kept values
}


@pytest.mark.parametrize("name", list(PRESSES))
def test_each_request_generates_what_it_generates_alone(model: Any, name: str) -> None:
    press = PRESSES[name]()
    prompts = _prompts()
    chunked: set[str] = set()

    def note_chunked(manager: PressBatchingManager) -> None:
        for rid, state in manager.batch_processor.scheduler.active_requests.items():
            if state.remaining_prefill_tokens and not state.generated_tokens:
                chunked.add(rid)

    outputs, manager = _run(model, _waves(prompts), press=press, callbacks=(note_chunked,))
    assert len(chunked) >= 6  # prompts the engine prefilled in several forwards
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == _alone(model, press, prompt), len(prompt)
    records = [manager.compression_info(f"req_{i}") for i in range(len(prompts))]
    assert all(r is not None for r in records)
    for prompt, record in zip(prompts, records, strict=True):
        assert record is not None and record.prompt_tokens == len(prompt)
        assert record.kept_tokens == min(len(prompt), BUDGET)
        assert record.compressed == (len(prompt) > BUDGET)
        # The pages beyond the kept tokens went back to the pool.
        assert record.freed_pages == math.ceil(len(prompt) / PAGE) - math.ceil(record.kept_tokens / PAGE)


def test_a_final_chunk_shorter_than_the_window_scores_with_the_earlier_chunks_queries(model: Any) -> None:
    """A 50-token prompt alone, 48 tokens per batch: the last chunk holds 2 tokens, fewer than the window."""
    press = mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW)
    prompt = _prompts((50,), seed=3)[0]
    outputs, _ = _run(model, [[prompt]], press=press)
    assert outputs[0] == _alone(model, press, prompt)


def test_requests_with_their_own_press_or_none(model: Any) -> None:
    prompts = _prompts((90, 70, 110, 60), seed=1)
    own = [
        None,
        mixkv.KnormPress(budget=24, window_size=WINDOW),
        FULL,
        mixkv.RandomPress(compression_ratio=0.5, window_size=WINDOW),
    ]
    default = mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW)
    outputs, manager = _run(model, [prompts], press=default, presses=own)
    expected_presses = [default, own[1], None, own[3]]
    for prompt, output, press in zip(prompts, outputs, expected_presses, strict=True):
        assert output == _alone(model, press, prompt)
    info = manager.compression_info("req_2")
    assert info is not None and info.press is None and not info.compressed
    info = manager.compression_info("req_3")
    assert info is not None and info.press == "random" and info.kept_tokens == 30


def test_a_budget_above_every_prompt_changes_nothing(model: Any) -> None:
    prompts = _prompts()
    plain, _ = _run(model, _waves(prompts))
    pressed, manager = _run(model, _waves(prompts), press=mixkv.SnapKVPress(budget=200, window_size=WINDOW))
    assert pressed == plain
    records = [manager.compression_info(f"req_{i}") for i in range(len(prompts))]
    assert all(record is not None and not record.compressed for record in records)


def test_pages_in_use_are_what_the_live_requests_hold(model: Any) -> None:
    """After every step each request holds ceil(tokens it caches / page) pages, counted from its
    prompt, its budget and its answer so far, and nothing else is in use; at the end all are free."""
    press = mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW)
    failures: list[str] = []
    checked = [0]
    last: list[Any] = []

    def check(manager: PressBatchingManager) -> None:
        usage = manager.page_usage()
        active = manager.batch_processor.scheduler.active_requests
        expected: dict[str, int] = {}
        for rid, state in active.items():
            prompt = len(state.initial_tokens)
            if state.generated_tokens:
                held = min(prompt, BUDGET) + len(state.generated_tokens) - 1
            else:
                held = prompt - len(state.remaining_prefill_tokens)
            expected[rid] = math.ceil(held / PAGE)
        expected = {rid: pages for rid, pages in expected.items() if pages}
        if usage.pages != expected or usage.in_use != sum(expected.values()):
            failures.append(f"step {checked[0]}: {usage.pages} (in use {usage.in_use}) != {expected}")
        checked[0] += 1
        last[:] = [usage]

    _run(model, _waves(_prompts()), press=press, callbacks=(check,))
    assert not failures, failures[:3]
    assert checked[0] > 20
    assert last[0].free == last[0].total and not last[0].pages  # after the last step


def test_every_page_is_free_once_all_requests_finished(model: Any) -> None:
    with PressBatchingManager(
        model,
        press=mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW),
        generation_config=GEN,
        batching_config=_config(),
    ) as manager:
        total = manager.page_usage().total
        assert manager.cache_capacity_tokens == total * PAGE
        ids = [manager.add_request(p, max_new_tokens=NEW_TOKENS) for p in _prompts()[:8]]
        done = 0
        while done < len(ids):
            result = manager.get_result(timeout=10)
            assert result is not None
            done += result.is_finished()
        usage = manager.page_usage()
        assert usage.free == usage.total == total and not usage.pages


def test_cancelling_a_request_frees_its_pages(model: Any) -> None:
    steps = Steps()
    press = mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW)
    with PressBatchingManager(
        model, press=press, generation_config=GEN, batching_config=_config()
    ) as manager:
        manager.add_step_callback(steps)
        rid = manager.add_request(_prompts((120,))[0], max_new_tokens=400)
        assert rid is not None
        steps.wait(6)
        held = manager.page_usage().pages[rid]
        assert held >= math.ceil((BUDGET + 4) / PAGE)  # compressed, then decoding
        manager.cancel_request(rid)
        deadline = time.monotonic() + 10
        while rid in manager.page_usage().pages:
            assert time.monotonic() < deadline, "the cancelled request kept its pages"
            time.sleep(0.05)
        usage = manager.page_usage()
        assert usage.free == usage.total


def test_a_manager_started_again_after_stop_still_compresses(model: Any) -> None:
    press = mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW)
    prompts = _prompts((90, 60), seed=7)
    manager = PressBatchingManager(model, press=press, generation_config=GEN, batching_config=_config())
    for prompt in prompts:
        with manager:
            rid = manager.add_request(prompt, max_new_tokens=NEW_TOKENS)
            result = manager.get_result(timeout=30)
            assert result is not None and result.request_id == rid and result.is_finished()
        assert model.config._attn_implementation == "sdpa"
        assert result.generated_tokens == _alone(model, press, prompt)
        info = manager.compression_info(rid)
        assert info is not None and info.compressed


def test_generate_batch_returns_outputs_in_input_order(model: Any) -> None:
    press = mixkv.MixKVPress(budget=BUDGET, window_size=WINDOW)
    prompts = _prompts((70, 20, 100), seed=5)
    outputs = generate_batch(model, prompts, press=press, generation_config=GEN)
    assert list(outputs) == ["req_0", "req_1", "req_2"]
    for prompt, output in zip(prompts, outputs.values(), strict=True):
        assert output.generated_tokens == _alone(model, press, prompt)
    assert model.config._attn_implementation == "sdpa"  # given back


def test_an_eager_model_matches_too() -> None:
    model = random_llama(128, layers=2, attn_implementation="eager", initializer_range=0.2)
    press = mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW)
    prompts = _prompts((60, 25, 90), seed=2)
    outputs = generate_batch(model, prompts, press=press, generation_config=GEN, batching_config=_config())
    for prompt, output in zip(prompts, outputs.values(), strict=True):
        assert output.generated_tokens == _alone(model, press, prompt)
    assert model.config._attn_implementation == "eager"


# -- bounded decoding ------------------------------------------------------------------------------

DECODE_TOKENS = 40
DECODE_TARGET = 24
INTERVAL = 8


def _decoding(base: str = "snapkv") -> Any:
    inner = PRESSES[base]()
    return mixkv.DecodingPress(inner, budget=DECODE_TARGET, interval=INTERVAL)


def _alone_decoding(model: Any, press: Any, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with press(model):
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=DECODE_TOKENS, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def _held_under_decoding(prompt: int, generated: int, remaining_prefill: int) -> int:
    """Tokens a request holds after a step, by DecodingPress's rule (cache_compressor.on_decode)."""
    if not generated:
        return prompt - remaining_prefill
    held = min(prompt, BUDGET)
    floor = max(held if prompt > BUDGET else 0, DECODE_TARGET)
    for _ in range(generated - 1):  # decode forwards so far
        held += 1
        if held >= floor + INTERVAL:
            held = floor = DECODE_TARGET
    return held


@pytest.mark.parametrize("base", ["snapkv", "mixkv-snapkv"])
def test_decoding_press_recompresses_each_request_as_generate_does(model: Any, base: str) -> None:
    """Requests of different lengths arriving at different times, 40 new tokens (several
    recompressions each): every output equals its own ``with DecodingPress(...)(model): generate``,
    and after every step each request holds ceil(held / page) pages, held following the rule."""
    lengths = (12, 150, 40, 77, 31, 96, 20, 130, 57)
    prompts = _prompts(lengths, seed=4)
    failures: list[str] = []
    most = [0]

    def check(manager: PressBatchingManager) -> None:
        usage = manager.page_usage()
        expected: dict[str, int] = {}
        for rid, state in manager.batch_processor.scheduler.active_requests.items():
            held = _held_under_decoding(
                len(state.initial_tokens), len(state.generated_tokens), len(state.remaining_prefill_tokens)
            )
            if usage.tokens[rid] != held:
                failures.append(f"{rid}: holds {usage.tokens[rid]} tokens, expected {held}")
            if state.generated_tokens:
                most[0] = max(most[0], held)
            expected[rid] = math.ceil(held / PAGE)
        expected = {rid: pages for rid, pages in expected.items() if pages}
        if usage.pages != expected or usage.in_use != sum(expected.values()):
            failures.append(f"{usage.pages} (in use {usage.in_use}) != {expected}")

    press = _decoding(base)
    gen = GenerationConfig(max_new_tokens=DECODE_TOKENS, do_sample=False, eos_token_id=-1)
    steps = Steps()
    manager = PressBatchingManager(model, press=press, generation_config=gen, batching_config=_config())
    manager.add_step_callback(steps)
    manager.add_step_callback(check)
    ids: list[str] = []
    results: dict[str, Any] = {}
    with manager:
        for number, wave in enumerate([prompts[:3], prompts[3:6], prompts[6:]]):
            if number:
                steps.wait(5)
            ids += [
                rid for rid in (manager.add_request(p, max_new_tokens=DECODE_TOKENS) for p in wave) if rid
            ]
        while len(results) < len(ids):
            result = manager.get_result(timeout=10)
            assert result is not None, "continuous batching did not finish"
            assert result.error is None, result.error
            results[result.request_id] = result
    assert not failures, failures[:3]
    assert most[0] == BUDGET + INTERVAL - 1  # the bound: max(prompt budget, target) + interval - 1
    compressions = press.compressions
    for prompt, rid in zip(prompts, ids, strict=True):
        assert results[rid].generated_tokens == _alone_decoding(model, press, prompt), len(prompt)
    layers = model.config.num_hidden_layers
    assert compressions >= 4 * len(prompts) * layers  # recompressed several times per request


# -- per-layer budgets --------------------------------------------------------------------------------

PYRAMIDS = {
    "pyramidkv": lambda: mixkv.PyramidKVPress(budget=BUDGET, window_size=WINDOW),
    "mixkv-pyramidkv": lambda: mixkv.MixKVPress(budget=BUDGET, window_size=WINDOW, base="pyramidkv"),
}


@pytest.mark.parametrize("name", list(PYRAMIDS))
def test_per_layer_budgets_match_generate_and_hold_their_largest_layer(model: Any, name: str) -> None:
    """Each layer keeps its own budget in its first slots, the others masked: outputs equal
    ``with press(model): generate``; a request's cache length, and pages, follow its largest layer."""
    from mixkv.functional import pyramid_budgets

    press = PYRAMIDS[name]()
    lengths = (12, 150, 40, 77, 31, 96, 50, 130, 20)
    prompts = _prompts(lengths, seed=6)
    layers = model.config.num_hidden_layers

    def largest(prompt: int) -> int:
        if prompt <= BUDGET:
            return prompt
        return int(pyramid_budgets(layers, BUDGET, WINDOW, prompt).max())

    failures: list[str] = []

    def check(manager: PressBatchingManager) -> None:
        usage = manager.page_usage()
        expected: dict[str, int] = {}
        for rid, state in manager.batch_processor.scheduler.active_requests.items():
            prompt = len(state.initial_tokens)
            if state.generated_tokens:
                held = largest(prompt) + len(state.generated_tokens) - 1
            else:
                held = prompt - len(state.remaining_prefill_tokens)
            expected[rid] = math.ceil(held / PAGE)
        expected = {rid: pages for rid, pages in expected.items() if pages}
        if usage.pages != expected or usage.in_use != sum(expected.values()):
            failures.append(f"{usage.pages} (in use {usage.in_use}) != {expected}")

    outputs, manager = _run(model, [prompts[:4], prompts[4:]], press=press, callbacks=(check,))
    assert not failures, failures[:3]
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == _alone(model, press, prompt), len(prompt)
    for i, prompt in enumerate(prompts):
        record = manager.compression_info(f"req_{i}")
        assert record is not None and record.kept_tokens == largest(len(prompt))
        if len(prompt) > BUDGET:  # the largest layer keeps more than the mean (all of a short prompt)
            assert BUDGET < record.kept_tokens <= len(prompt)
            assert record.kept_tokens < len(prompt) or len(prompt) < 2 * BUDGET


def test_per_layer_budgets_on_an_eager_model() -> None:
    model = random_llama(128, layers=2, attn_implementation="eager", initializer_range=0.2)
    press = PYRAMIDS["pyramidkv"]()
    prompts = _prompts((60, 25, 90), seed=2)
    outputs = generate_batch(model, prompts, press=press, generation_config=GEN, batching_config=_config())
    for prompt, output in zip(prompts, outputs.values(), strict=True):
        assert output.generated_tokens == _alone(model, press, prompt)


# -- refusals --------------------------------------------------------------------------------------


class _KvpressLike:
    """Stands for a kvpress press (kvpress may not be installed)."""


_KvpressLike.__module__ = "kvpress.presses.snapkv_press"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (
            lambda: mixkv.DecodingPress(mixkv.PyramidKVPress(budget=64)),
            ("DecodingPress(pyramidkv)", "per-layer budgets", "one length for every layer"),
        ),
        (lambda: mixkv.AdaKVPress(budget=64), ("adakv", "each KV head")),
        (lambda: mixkv.MixKVPress(budget=64, base="adakv"), ("mixkv-adakv", "each KV head")),
        (lambda: mixkv.SparseMMPress(budget=64, head_scores=torch.rand(3, 4)), ("sparsemm", "each KV head")),
        (
            lambda: mixkv.MixKVPress(budget=64, base="sparsemm", head_scores=torch.rand(3, 4)),
            ("mixkv-sparsemm", "each KV head"),
        ),
        (
            lambda: mixkv.DecodingPress(mixkv.AdaKVPress(budget=64)),
            ("DecodingPress(adakv)", "each KV head"),
        ),
        (_KvpressLike, ("kvpress presses", "mixkv press")),
        (lambda: mixkv.ExpectedAttentionPress(budget=64), ("expectedattention", "rotary tables")),
        (lambda: mixkv.MixKVExpectedAttentionPress(budget=64), ("mixkv-expectedattention", "rotary tables")),
        (lambda: mixkv.VLCachePress(budget=64), ("vlcache", "head_budgets")),
        (lambda: mixkv.MixKVPress(budget=64, base="vlcache"), ("mixkv-vlcache", "sparsity")),
    ],
)
def test_refused_presses_are_named_with_the_reason(model: Any, make: Any, words: tuple[str, ...]) -> None:
    press = make()
    with pytest.raises(ValueError) as refused:
        PressBatchingManager(model, press=press, generation_config=GEN, batching_config=_config())
    assert all(word in str(refused.value) for word in words), str(refused.value)
    assert model.config._attn_implementation == "sdpa"
    manager = PressBatchingManager(model, generation_config=GEN, batching_config=_config())
    try:
        with pytest.raises(ValueError) as refused:
            manager.add_request([1, 2, 3], press=press)
        assert words[0] in str(refused.value)
    finally:
        manager.stop()
    assert model.config._attn_implementation == "sdpa"


def test_refused_models_and_settings(model: Any) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    gemma = Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=16,
            attn_implementation="sdpa",
        )
    ).eval()
    with pytest.raises(ValueError, match="sliding_attention layers"):
        PressBatchingManager(gemma, press=mixkv.SnapKVPress(budget=64), batching_config=_config())
    flex = random_llama(128, layers=2, attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="flex_attention"):
        PressBatchingManager(flex, batching_config=_config())
    press = mixkv.SnapKVPress(budget=64)
    with pytest.raises(ValueError, match="block_sharing=True cannot be combined with a press"):
        PressBatchingManager(model, press=press, block_sharing=True, batching_config=_config())
    async_config = ContinuousBatchingConfig(page_size=PAGE, num_blocks=64, use_async_batching=True)
    with pytest.raises(ValueError, match="use_async_batching=True"):
        PressBatchingManager(model, press=press, batching_config=async_config)
    sharing = PressBatchingManager(
        model, block_sharing=True, generation_config=GEN, batching_config=_config()
    )
    try:
        with pytest.raises(ValueError, match="full caches only"):
            sharing.add_request([1, 2, 3], press=press)
    finally:
        sharing.stop()
    press = mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW)
    small = PressBatchingManager(
        model, press=press, generation_config=GEN, batching_config=_config(num_blocks=8)
    )
    try:
        assert small.cache_capacity_tokens == 64
        with pytest.raises(ValueError, match="can never fit"):
            small.add_request(list(range(1, 70)), max_new_tokens=4)  # the prompt itself does not fit
        with pytest.raises(ValueError, match="can never fit"):
            small.add_request(list(range(1, 40)), max_new_tokens=40, press=FULL)
        small.add_request(list(range(1, 60)), max_new_tokens=30)  # fits once compressed to 32
    finally:
        small.stop()
    assert model.config._attn_implementation == "sdpa"


def test_an_older_transformers_is_refused_naming_the_version_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.2.0")
    reason = engine_unavailable_reason()
    assert reason is not None and "5.25" in reason and "5.2.0" in reason
