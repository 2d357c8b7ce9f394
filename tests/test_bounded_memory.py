"""Bounded memory: chunked prefill under a press and bounded decoding with DecodingPress."""

import pytest
import torch
from transformers import DynamicCache

import mixkv
from mixkv.integration.cache import CompressedLayer
from tests.families import build_case
from tests.helpers_tiny import press_test_llama
from tests.test_press_api import prompt

WINDOW = 8
BUDGET = 40


@pytest.fixture(scope="module")
def model():
    return press_test_llama()


PRESSES = {
    "snapkv": lambda: mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW),
    "adakv": lambda: mixkv.AdaKVPress(budget=BUDGET, window_size=WINDOW),
    "mixkv-adakv": lambda: mixkv.MixKVPress(budget=BUDGET, window_size=WINDOW, base="adakv"),
    "mixkv-pyramidkv": lambda: mixkv.MixKVPress(budget=BUDGET, window_size=WINDOW, base="pyramidkv"),
    "streamingllm": lambda: mixkv.StreamingLLMPress(budget=BUDGET, window_size=WINDOW),
}


def held_per_head(layer):
    """Entries per KV head each sequence holds in a layer, averaged over its heads ``(B,)``."""
    if isinstance(layer, CompressedLayer):
        return layer.held_counts().float().mean(-1)
    return torch.full((layer.keys.shape[0],), float(layer.keys.shape[2]))


class HeldRecorder:
    """After every attention forward: what its layer holds per KV head (the cache's peak is that
    plus the next forward's tokens)."""

    def __init__(self, model):
        self.held = {}
        self.handles = []
        for idx, layer in enumerate(model.model.layers):
            self.handles.append(layer.self_attn.register_forward_hook(self._hook(idx), with_kwargs=True))

    def _hook(self, idx):
        def hook(module, args, kwargs, output):
            cache = next(v for v in (*args, *kwargs.values()) if isinstance(v, DynamicCache))
            self.held.setdefault(idx, []).append(held_per_head(cache.layers[idx]).max().item())

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def padded_batch(lengths=(300, 150), seed=4):
    rows = [prompt(n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    longest = max(lengths)
    ids = torch.zeros((len(rows), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, longest - row.shape[0] :] = row
        mask[i, longest - row.shape[0] :] = 1
    return ids, mask


def cache_tensors(cache):
    out = []
    for layer in cache.layers:
        out += layer.tensors() if isinstance(layer, CompressedLayer) else [layer.keys, layer.values]
    return out


@pytest.mark.parametrize("name", ["snapkv", "mixkv-adakv"])
def test_generate_with_a_chunk_at_least_the_prompt_is_bit_identical_to_one_go(model, name):
    ids = prompt(150, seed=2)
    results = []
    for chunk in (None, 150, 512):
        press = PRESSES[name]()
        cache = DynamicCache(config=model.config)
        with press(model):
            out = model.generate(
                ids, past_key_values=cache, max_new_tokens=6, do_sample=False, prefill_chunk_size=chunk
            )
        results.append((out, cache_tensors(cache), press.last_report.kept_tokens))
    for out, tensors, kept in results[1:]:
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(tensors, results[0][1], strict=True))
        assert torch.equal(kept, results[0][2])


def test_a_one_chunk_block_is_bit_identical_to_one_go(model):
    ids = prompt(150, seed=2)
    caches = []
    for chunked in (False, True):
        press = PRESSES["mixkv-adakv"]()
        cache = DynamicCache(config=model.config)
        with press(model) as session:
            if chunked:
                with session.chunked_prefill():
                    model(ids, past_key_values=cache)
            else:
                model(ids, past_key_values=cache)
        caches.append(cache_tensors(cache))
    assert all(torch.equal(a, b) for a, b in zip(*caches, strict=True))


@pytest.mark.parametrize("name", sorted(PRESSES))
@pytest.mark.parametrize("chunk", [5, 64])
def test_generate_chunked_prefill_never_holds_more_than_budget_plus_chunk(model, name, chunk):
    press = PRESSES[name]()
    recorder = HeldRecorder(model)
    try:
        with press(model):
            model.generate(prompt(300, seed=3), max_new_tokens=1, do_sample=False, prefill_chunk_size=chunk)
    finally:
        recorder.remove()
    report = press.last_report
    # PyramidKV gives each layer its own budget (a prompt under the budget is kept whole).
    layer_budget = report.kept_tokens[0].float().mean(-1).clamp(min=BUDGET)
    for idx, held in recorder.held.items():
        assert len(held) == -(-300 // chunk)  # one record per chunk
        assert max(held) <= layer_budget[idx] + 1e-6
    assert report.context_lengths == [300]
    assert report.compressed_layers == [0, 1, 2]


@pytest.mark.parametrize("name", ["snapkv", "mixkv-adakv"])
def test_padded_batch_chunked_prefill_never_holds_more_than_budget_plus_chunk(model, name):
    ids, mask = padded_batch()  # row 1 is all padding for its first two 64-token chunks
    press = PRESSES[name]()
    recorder = HeldRecorder(model)
    try:
        with press(model):
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, prefill_chunk_size=64
            )
    finally:
        recorder.remove()
    assert all(max(held[:5]) <= BUDGET + 1e-6 for held in recorder.held.values())
    assert press.last_report.context_lengths == [300, 150]
    assert not torch.isnan(model(out).logits).any()
    assert (press.last_report.kept_tokens.float().mean(-1) <= BUDGET).all()


def test_manual_chunks_in_a_block_keep_the_cache_bounded_and_the_report_whole(model):
    ids = prompt(300, seed=7)
    press = PRESSES["adakv"]()
    cache = DynamicCache(config=model.config)
    with press(model) as session:
        with session.chunked_prefill():
            for start in range(0, 300, 50):
                model(ids[:, start : start + 50], past_key_values=cache)
                assert all(held_per_head(layer).max() <= BUDGET for layer in cache.layers)
        report = press.last_report
        assert report.context_lengths == [300]
        assert report.compressed_bytes == mixkv.kv_cache_bytes(cache)
        model(prompt(20, seed=8), past_key_values=cache)  # after the block: appended (a question)
    assert all((held_per_head(layer) == BUDGET + 20).all() for layer in cache.layers)


def test_chunked_report_full_bytes_are_those_of_the_uncompressed_cache(model):
    ids = prompt(300, seed=7)
    reports = []
    for chunk in (None, 64):
        press = PRESSES["snapkv"]()
        cache = DynamicCache(config=model.config)
        with press(model):
            model.generate(ids, past_key_values=cache, max_new_tokens=1, prefill_chunk_size=chunk)
        reports.append(press.last_report)
    assert reports[1].full_bytes == reports[0].full_bytes
    assert reports[1].compressed_bytes == reports[0].compressed_bytes


def test_the_last_step_scores_with_the_prompts_true_last_window_across_chunks(model):
    # The budget holds everything before the last chunk, so only the last step compresses; its
    # window spans chunks (the last holds 6 tokens < WINDOW) and must pick what one go picks.
    ids = prompt(120, seed=9)
    press = mixkv.SnapKVPress(budget=114, window_size=WINDOW)
    kept = []
    for chunks in ((120,), (114, 6), (110, 4, 6)):
        cache = DynamicCache(config=model.config)
        with press(model) as session, session.chunked_prefill():
            start = 0
            for size in chunks:
                model(ids[:, start : start + size], past_key_values=cache)
                start += size
        kept.append(cache.layers[1].keys)
    for keys in kept[1:]:
        torch.testing.assert_close(keys, kept[0], rtol=1e-4, atol=1e-5)


def test_chunked_prefill_leaves_gemma3_sliding_window_layers_alone():
    case = build_case("gemma3_text")
    ids = case.inputs["input_ids"]
    press = mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW)
    cache = DynamicCache(config=case.model.config)
    with press(case.model):
        case.model.generate(
            ids, past_key_values=cache, max_new_tokens=2, do_sample=False, prefill_chunk_size=16
        )
    for idx, kind in enumerate(case.layer_types):
        compressed = isinstance(cache.layers[idx], CompressedLayer)
        assert compressed == (kind == "full_attention" and ids.shape[1] > BUDGET)
        if kind == "sliding_attention":
            assert "sliding-window" in press.last_report.skipped_layers[idx]


def test_nested_chunked_prefill_blocks_are_refused(model):
    with (
        mixkv.SnapKVPress(budget=BUDGET)(model) as session,
        session.chunked_prefill(),
        pytest.raises(RuntimeError, match="nested"),
        session.chunked_prefill(),
    ):
        pass


# -- DecodingPress -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["snapkv", "mixkv-adakv"])
def test_decoding_press_generates_the_plain_press_tokens_while_under_its_bound(model, name):
    ids = prompt(150, seed=12)
    plain = PRESSES[name]()
    with plain(model):
        expected = model.generate(ids, max_new_tokens=20, do_sample=False)
    bounded = mixkv.DecodingPress(PRESSES[name](), interval=24)
    with bounded(model):
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(out, expected)
    assert bounded.compressions == 0


@pytest.mark.parametrize("name", ["snapkv", "adakv", "mixkv-adakv", "mixkv-pyramidkv"])
def test_decoding_press_never_holds_more_than_budget_plus_interval(model, name):
    bounded = mixkv.DecodingPress(PRESSES[name](), interval=8)
    recorder = HeldRecorder(model)
    try:
        with bounded(model):
            model.generate(prompt(150, seed=13), max_new_tokens=60, do_sample=False)
    finally:
        recorder.remove()
    after_prefill = bounded.last_report.kept_tokens[0].float().mean(-1)
    for idx, held in recorder.held.items():
        assert max(held) < max(after_prefill[idx].item(), BUDGET) + 8
    assert bounded.compressions >= 3  # every layer at least once


def test_decoding_press_bounds_a_padded_batch_and_a_prompt_under_the_budget(model):
    ids, mask = padded_batch(lengths=(150, 20))
    bounded = mixkv.DecodingPress(PRESSES["mixkv-adakv"](), interval=8)
    recorder = HeldRecorder(model)
    try:
        with bounded(model):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=60, do_sample=False)
    finally:
        recorder.remove()
    assert all(max(held) < BUDGET + 8 for held in recorder.held.values())
    assert out.shape[1] == 150 + 60


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval": 0}, "interval"),
        ({"budget": WINDOW}, "larger than the press's window_size"),
    ],
)
def test_bad_decoding_press_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mixkv.DecodingPress(mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW), **kwargs)


def test_decoding_press_over_a_ratio_press_needs_a_budget():
    with pytest.raises(ValueError, match="needs budget="):
        mixkv.DecodingPress(mixkv.SnapKVPress(compression_ratio=0.5))
