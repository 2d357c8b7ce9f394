"""A press compressing a recorded prompt forward keeps exactly what it keeps running that forward."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from mixkv.eval.tasks import make_examples
from mixkv.eval.text_example_run import prefill_shared_prefix, run_examples_together
from mixkv.integration.cache import CompressedLayer
from mixkv.presses.registry import from_name
from tests.helpers_tiny import tiny_llama, word_tokenizer

METHODS = [
    "snapkv",
    "mixkv-snapkv",
    "pyramidkv",
    "mixkv-pyramidkv",
    "adakv",
    "mixkv-adakv",
    "keydiff",
    "streamingllm",
    "random",
]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(64, seed=0, layers=3)


@pytest.fixture(scope="module")
def prompts():
    # Two prompts of 60 and 45 tokens, the shorter left-padded: per-sequence lengths and padding.
    ids = torch.randint(4, 64, (2, 60), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :15] = 0
    ids[1, :15] = 0
    return ids, mask


def _press(method):
    return from_name(method, 20, window_size=8)


def _prefilled_under(press, model, ids, mask):
    cache = DynamicCache()
    with torch.inference_mode(), press(model):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return cache, press.last_report


def _recording(model, ids, mask, window=8):
    cache = DynamicCache()
    with torch.inference_mode(), _press("snapkv")(model) as session, session.recording_prompt(window) as rec:
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return rec


def _assert_same_entries(cache, other):
    assert len(cache.layers) == len(other.layers)
    for layer, other_layer in zip(cache.layers, other.layers, strict=True):
        assert type(layer) is type(other_layer)
        assert isinstance(layer, CompressedLayer)
        for held, other_held in zip(layer.entries(), other_layer.entries(), strict=True):
            assert torch.equal(held, other_held)


@pytest.mark.parametrize("method", METHODS)
def test_compressing_a_recording_keeps_the_entries_of_a_prefill_under_the_press(model, prompts, method):
    ids, mask = prompts
    torch.manual_seed(0)
    reference, reference_report = _prefilled_under(_press(method), model, ids, mask)
    recorded = _recording(model, ids, mask)
    press = _press(method)
    torch.manual_seed(0)
    with torch.inference_mode(), press(model) as session:
        replayed = session.compress_recorded(recorded)
    _assert_same_entries(replayed, reference)
    assert torch.equal(press.last_report.kept_tokens, reference_report.kept_tokens)
    assert press.last_report.compressed_bytes == reference_report.compressed_bytes


def test_presses_compressing_one_recording_reuse_its_window_importance(model, prompts, monkeypatch):
    import mixkv.presses.base as base

    calls = []
    computed = base.window_importance
    monkeypatch.setattr(base, "window_importance", lambda *a, **k: calls.append(1) or computed(*a, **k))
    recorded = _recording(model, *prompts)
    assert len(calls) == 3  # the recording press scored each of the 3 layers
    for method in ("adakv", "mixkv-snapkv", "pyramidkv"):
        with torch.inference_mode(), _press(method)(model) as session:
            session.compress_recorded(recorded)
    assert len(calls) == 3
    with torch.inference_mode(), from_name("snapkv", 20, window_size=4)(model) as session:
        session.compress_recorded(recorded)  # another window: its own importance
    assert len(calls) == 6


def test_a_replayed_cache_answers_like_the_prefilled_one(model, prompts):
    ids, mask = prompts
    recorded = _recording(model, ids, mask)
    press = _press("mixkv-adakv")
    step = torch.tensor([[5], [6]])
    step_mask = torch.cat([mask, torch.ones_like(step)], dim=1)
    with torch.inference_mode(), press(model) as session:
        prefilled = DynamicCache()
        model(input_ids=ids, attention_mask=mask, past_key_values=prefilled, use_cache=True)
        replayed = session.compress_recorded(recorded)
        logits = [
            model(input_ids=step, attention_mask=step_mask, past_key_values=cache, use_cache=True).logits
            for cache in (prefilled, replayed)
        ]
    assert torch.equal(logits[0], logits[1])


def test_a_press_with_a_larger_window_than_recorded_is_refused(model, prompts):
    recorded = _recording(model, *prompts, window=8)
    press = from_name("snapkv", 20, window_size=16)
    with press(model) as session, pytest.raises(ValueError, match="window_size"):
        session.compress_recorded(recorded)


def test_an_empty_recording_is_refused(model, prompts):
    with _press("snapkv")(model) as session:
        with session.recording_prompt() as recorded:
            pass
        with pytest.raises(ValueError, match="no complete prompt forward"):
            session.compress_recorded(recorded)


def test_a_chunked_prompt_cannot_be_recorded(model, prompts):
    ids, _ = prompts
    cache = DynamicCache()
    with (
        torch.inference_mode(),
        _press("snapkv")(model) as session,
        session.recording_prompt(),
        session.chunked_prefill(),
        pytest.raises(ValueError, match="not in chunks"),
    ):
        model(input_ids=ids[:1, :30], past_key_values=cache, use_cache=True)


def test_presses_decoded_together_run_the_prompt_forward_once():
    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer), seed=0, layers=3)
    example = make_examples("niah_single_1", tokenizer, 160, 1)[0]
    prefix = prefill_shared_prefix(model, tokenizer, example, protocol="query_aware", tail_tokens=8)
    presses = [from_name(m, 40, window_size=8) for m in ("snapkv", "adakv", "mixkv-snapkv")]
    prompt_forwards = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: prompt_forwards.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        records = run_examples_together(
            model, tokenizer, example, presses, protocol="query_aware", max_new_tokens=3, prefix=prefix
        )
    finally:
        handle.remove()
    assert [n for n in prompt_forwards if n > 1] == [8]  # the tail, once; then one token per step
    assert [r.get("prefill_replayed", False) for r in records] == [False, True, True]
