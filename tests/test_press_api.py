"""The press API on a tiny Llama: validation, clean attach/detach, batches, selection, ratios."""

import copy
import dataclasses

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import mixkv
from tests.helpers_tiny import press_test_llama
from tests.reference import kept_positions

WINDOW = 8


@pytest.fixture(scope="module")
def model():
    return press_test_llama()


def prompt(length=120, seed=1):
    return torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of budget"),
        ({"budget": 64, "compression_ratio": 0.5}, "exactly one of budget"),
        ({"budget": 0}, "positive"),
        ({"budget": -3}, "positive"),
        ({"budget": 32}, "larger than window_size"),
        ({"budget": 64, "window_size": 0}, "window_size"),
        ({"compression_ratio": 1.0}, r"\[0, 1\)"),
        ({"budget": 64, "kernel_size": 4}, "odd"),
        ({"budget": 64, "pooling": "median"}, "pooling"),
    ],
)
def test_bad_press_arguments_raise_value_errors_that_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mixkv.SnapKVPress(**kwargs)


def test_unknown_mixkv_base_is_refused_with_the_valid_choices():
    with pytest.raises(ValueError, match="snapkv, pyramidkv, adakv, sparsemm"):
        mixkv.MixKVPress(budget=64, base="h2o")


def test_sparsemm_without_head_scores_is_refused():
    with pytest.raises(ValueError, match="needs head_scores"):
        mixkv.SparseMMPress(budget=64)


def test_redundancy_table_of_another_model_shape_is_refused(model):
    press = mixkv.MixKVPress(budget=40, window_size=WINDOW, redundancy=torch.full((28, 4), 0.5))
    with pytest.raises(ValueError, match=r"\(28, 4\).*3 layers x 2 KV heads"):
        press(model)


def test_unsupported_model_family_is_refused_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"'gpt2'.*not supported"):
        mixkv.SnapKVPress(budget=64)(gpt2)


def test_unsupported_attention_implementation_is_refused_by_name():
    llama = press_test_llama()
    llama.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="'flex_attention' is not supported"):
        mixkv.SnapKVPress(budget=64)(llama)


def _is_clean(model):
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    return (
        model.config._attn_implementation == "sdpa"
        and "mixkv_sdpa" not in ALL_ATTENTION_FUNCTIONS
        and "mixkv_sdpa" not in ALL_MASK_ATTENTION_FUNCTIONS
        and not model._forward_pre_hooks
        and all(not m._forward_pre_hooks and not m._forward_hooks for m in modules)
    )


def test_everything_is_restored_on_exit(model):
    with mixkv.SnapKVPress(budget=40, window_size=WINDOW)(model):
        assert model.config._attn_implementation == "mixkv_sdpa"
        model.generate(prompt(), max_new_tokens=2, do_sample=False)
    assert _is_clean(model)


def test_everything_is_restored_when_the_block_raises(model):
    with pytest.raises(KeyError), mixkv.AdaKVPress(budget=40, window_size=WINDOW)(model):
        model(prompt())
        raise KeyError("boom")
    assert _is_clean(model)


def test_importing_mixkv_changes_nothing_global():
    assert "mixkv_sdpa" not in ALL_ATTENTION_FUNCTIONS and "mixkv_eager" not in ALL_ATTENTION_FUNCTIONS


def test_a_second_press_on_the_same_model_is_refused(model):
    with (
        mixkv.SnapKVPress(budget=40, window_size=WINDOW)(model),
        pytest.raises(ValueError, match="already attached"),
        mixkv.KnormPress(budget=40)(model),
    ):
        pass
    assert _is_clean(model)


def test_a_compressed_cache_cannot_be_used_after_the_press_is_gone(model):
    cache = DynamicCache(config=model.config)
    with mixkv.SnapKVPress(budget=40, window_size=WINDOW)(model):
        model(prompt(), past_key_values=cache)
    with pytest.raises(RuntimeError, match="inside `with press"):
        model(prompt(1, seed=3), past_key_values=cache)


@dataclasses.dataclass
class RecordingSnapKV(mixkv.SnapKVPress):
    seen: list = dataclasses.field(default_factory=list, repr=False)

    def scores(self, ctx):
        scores = super().scores(ctx)
        self.seen.append((ctx.layer_idx, scores.clone(), self.head_budgets(ctx)))
        return scores


@dataclasses.dataclass
class RecordingAdaKV(mixkv.AdaKVPress):
    seen: list = dataclasses.field(default_factory=list, repr=False)

    def scores(self, ctx):
        scores = super().scores(ctx)
        self.seen.append((ctx.layer_idx, scores.clone(), self.head_budgets(ctx)))
        return scores


@pytest.mark.parametrize("press_class", [RecordingSnapKV, RecordingAdaKV])
def test_kept_entries_are_exactly_the_top_scoring_ones_under_each_head_budget(model, press_class):
    ids = prompt()
    full = DynamicCache(config=model.config)
    model(ids, past_key_values=full)
    press = press_class(budget=40, window_size=WINDOW)
    cache = DynamicCache(config=model.config)
    with press(model):
        model(ids, past_key_values=cache)
    assert len(press.seen) == 3
    for layer_idx, scores, budgets in press.seen:
        assert int(budgets.sum()) == 40 * budgets.numel()
        kept = kept_positions(cache.layers[layer_idx], full.layers[layer_idx].keys)
        # brute force: sort each head's scores, keep the best `budget - window`
        for h in range(scores.shape[1]):
            order = torch.argsort(scores[0, h], descending=True, stable=True)
            expected = torch.zeros(ids.shape[1], dtype=torch.bool)
            expected[order[: int(budgets[0, h]) - WINDOW]] = True
            expected[-WINDOW:] = True
            assert torch.equal(kept[0, h], expected)


@pytest.mark.parametrize(
    "press",
    [
        mixkv.SnapKVPress(budget=40, window_size=WINDOW),
        mixkv.AdaKVPress(budget=40, window_size=WINDOW),
        mixkv.MixKVPress(budget=40, window_size=WINDOW, base="adakv"),
        mixkv.PyramidKVPress(budget=40, window_size=WINDOW),
        mixkv.StreamingLLMPress(budget=40, window_size=WINDOW),
        mixkv.KeyDiffPress(budget=40, window_size=WINDOW),
    ],
    ids=lambda p: type(p).__name__ + ("-" + p.base if isinstance(p, mixkv.MixKVPress) else ""),
)
def test_left_padded_batch_keeps_and_generates_like_each_sequence_alone(model, press):
    long_row, short_row = prompt(120, seed=4)[0], prompt(90, seed=5)[0]
    pad = long_row.shape[0] - short_row.shape[0]
    ids = torch.stack([long_row, torch.cat([torch.zeros(pad, dtype=torch.long), short_row])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with press(model):
        batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        batch_kept = press.last_report.kept_tokens.clone()
        alone = []
        kept_alone = []
        for row in (long_row, short_row):
            alone.append(model.generate(row[None], max_new_tokens=5, do_sample=False)[0, -5:])
            kept_alone.append(press.last_report.kept_tokens[0])
    assert torch.equal(batched[:, -5:], torch.stack(alone))
    assert torch.equal(batch_kept, torch.stack(kept_alone))


def test_padding_positions_are_never_kept(model):
    ids = prompt(100, seed=6)
    ids[0, :30] = 0
    mask = torch.ones_like(ids)
    mask[0, :30] = 0
    full = DynamicCache(config=model.config)
    model(ids, attention_mask=mask, past_key_values=full)
    cache = DynamicCache(config=model.config)
    press = mixkv.AdaKVPress(budget=40, window_size=WINDOW)
    with press(model):
        model(ids, attention_mask=mask, past_key_values=cache)
    for layer_idx in range(3):
        kept = kept_positions(cache.layers[layer_idx], full.layers[layer_idx].keys)
        assert not kept[..., :30].any()
        assert int(kept.sum()) == 2 * 40
    assert press.last_report.context_lengths == [70]


def test_compression_ratio_keeps_that_fraction_of_each_prompt(model):
    press = mixkv.SnapKVPress(compression_ratio=0.75, window_size=WINDOW)
    with press(model):
        model(prompt(120), past_key_values=DynamicCache(config=model.config))
    assert press.last_report.budgets == [30]
    assert (press.last_report.kept_tokens == 30).all()


def test_report_accounts_memory_of_the_compressed_cache(model):
    press = mixkv.MixKVPress(budget=40, window_size=WINDOW, base="adakv")
    cache = DynamicCache(config=model.config)
    with press(model):
        model(prompt(120), past_key_values=cache)
    report = press.last_report
    entry_bytes = 2 * 16 * 4
    assert report.full_bytes == 3 * 2 * 120 * entry_bytes
    assert report.compressed_bytes == mixkv.kv_cache_bytes(cache)
    assert 3 * 2 * 40 * entry_bytes <= report.compressed_bytes <= 1.02 * 3 * 2 * 40 * entry_bytes


def test_query_agnostic_decoding_continues_from_a_compressed_cache(model):
    context, question = prompt(120, seed=7), prompt(6, seed=8)
    cache = DynamicCache(config=model.config)
    press = mixkv.MixKVPress(budget=40, window_size=WINDOW)
    with press(model):
        model(context, past_key_values=cache)
        out = model.generate(
            torch.cat([context, question], -1), past_key_values=cache, max_new_tokens=4, do_sample=False
        )
    assert out.shape[1] == 130
    assert cache.get_seq_length() == 129  # positions continue from the uncompressed length


@torch.no_grad()
def test_a_prefix_filled_before_the_press_is_compressed_with_the_rest_like_one_prefill(model):
    ids, split = prompt(120, seed=9), 100
    full_one_go, full_chunked = DynamicCache(config=model.config), DynamicCache(config=model.config)
    model(ids, past_key_values=full_one_go)
    model(ids[:, :split], past_key_values=full_chunked)
    prefilled = copy.deepcopy(full_chunked)
    model(ids[:, split:], past_key_values=full_chunked)
    one_go, chunked = (
        mixkv.AdaKVPress(budget=40, window_size=WINDOW),
        mixkv.AdaKVPress(budget=40, window_size=WINDOW),
    )
    cache = DynamicCache(config=model.config)
    with one_go(model):
        expected_logits = model(ids, past_key_values=cache).logits[:, -1]
    with chunked(model):
        logits = model(ids[:, split:], past_key_values=prefilled).logits[:, -1]
    assert chunked.last_report.context_lengths == [120]
    assert torch.equal(chunked.last_report.kept_tokens, one_go.last_report.kept_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    for layer_idx in range(3):
        assert torch.equal(
            kept_positions(prefilled.layers[layer_idx], full_chunked.layers[layer_idx].keys),
            kept_positions(cache.layers[layer_idx], full_one_go.layers[layer_idx].keys),
        )


def test_a_prefill_forward_shorter_than_the_window_is_not_compressed_and_says_why(model):
    ids = prompt(120, seed=10)
    cache = DynamicCache(config=model.config)
    model(ids[:, :116], past_key_values=cache)
    press = mixkv.SnapKVPress(budget=40, window_size=WINDOW)
    with press(model):
        model(ids[:, 116:], past_key_values=cache)
    assert cache.get_seq_length() == 120 and not isinstance(
        cache.layers[0], mixkv.integration.cache.CompressedLayer
    )
    assert "fewer than the observation window" in press.last_report.skipped_layers[0]


def test_only_the_first_multi_token_forward_through_a_cache_compresses_it(model):
    ids = prompt(140, seed=11)
    cache = DynamicCache(config=model.config)
    press = mixkv.SnapKVPress(budget=40, window_size=WINDOW)
    with press(model):
        model(ids[:, :120], past_key_values=cache)
        model(ids[:, 120:], past_key_values=cache)
        second = DynamicCache(config=model.config)
        model(ids[:, :100], past_key_values=second)
    assert cache.layers[0].keys.shape[2] == 40 + 20
    assert second.layers[0].keys.shape[2] == 40


def test_the_cache_argument_is_the_one_this_transformers_release_takes(model):
    import inspect

    from mixkv.integration.decoder_layout import cache_argument

    name = cache_argument(model)
    assert name in inspect.signature(model.forward).parameters
    cache = DynamicCache(config=model.config)
    model(prompt(20), **{name: cache})
    assert cache.get_seq_length() == 20


def test_find_cache_finds_the_cache_under_any_field_name(model):
    from mixkv.integration.decoder_layout import find_cache

    cache = DynamicCache(config=model.config)
    output = model(prompt(20), past_key_values=cache, use_cache=True)
    assert find_cache(output) is cache
    assert find_cache({"logits": None}, {"cache": cache}) is cache
    assert find_cache({"logits": None}) is None


def test_a_declared_prompt_must_be_longer_than_the_cache_and_come_first(model):
    ids = prompt(60, seed=11)
    cache = DynamicCache(config=model.config)
    model(ids[:, :50], past_key_values=cache)
    with mixkv.SnapKVPress(budget=40, window_size=WINDOW)(model) as session:
        with pytest.raises(ValueError, match="more than the 50 tokens the cache holds"):
            session.declare_prompt(cache, ids[:, :50])
        model(ids[:, 50:], past_key_values=cache)
        with pytest.raises(ValueError, match="before the cache's first prompt forward"):
            session.declare_prompt(cache, ids)
