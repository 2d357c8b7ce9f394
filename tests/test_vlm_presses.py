"""VL-Cache, LOOK-M and MixKV on VL-Cache: their formulas on small tensors, and on tiny VLMs.

The budget and masked-attention checks of VL-Cache and MixKV-VL-Cache on every family are in
``tests/test_press_families.py`` (their names are in its ``PRESS_NAMES``); LOOK-M changes the kept
values, so its cache is checked here against :func:`~mixkv.functional.pivot_merge` instead.
"""

import functools
import math

import pytest
import torch
from transformers import DynamicCache

import mixkv
from mixkv.functional import pivot_merge, post_vision_attention, post_vision_rows, running_density_budget
from mixkv.integration.cache import CompressedLayer
from mixkv.presses.multimodal import TEXT_PRIOR_BONUS
from mixkv.presses.registry import from_name
from tests.families import build_case

WINDOW = 8


# -- post-vision rows -----------------------------------------------------------------------------
def test_post_vision_rows_are_the_window_rows_after_the_last_visual_token():
    visual = torch.zeros(2, 12, dtype=torch.bool)
    visual[0, 2:7] = True  # last image token at 6: window rows 8.. are all post-vision
    visual[1, 2:10] = True  # last image token at 9: only rows at 10, 11 are post-vision
    rows = post_vision_rows(visual, 4)
    assert rows.tolist() == [[True, True, True, True], [False, False, True, True]]


def test_post_vision_rows_are_the_whole_window_without_a_visual_token_before_it():
    visual = torch.zeros(2, 12, dtype=torch.bool)
    visual[1, 11] = True  # an image at the very end: no window row follows it
    assert post_vision_rows(visual, 4).all()
    assert post_vision_rows(None, 4, key_mask=torch.ones(2, 12, dtype=torch.bool)).all()


def test_post_vision_rows_leave_out_padded_window_rows():
    key_mask = torch.ones(1, 6, dtype=torch.bool)
    key_mask[0, :3] = False
    assert post_vision_rows(None, 4, key_mask=key_mask).tolist() == [[False, True, True, True]]


# -- post-vision attention and sparsity ---------------------------------------------------------------
def loop_post_vision(queries, keys, rows, threshold, scaling):
    """Scores and sparsity by explicit loops over sequences, query heads and rows."""
    batch, heads, window, _ = queries.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    scores = torch.zeros(batch, kv_heads, length - window, dtype=torch.float64)
    sparsity = torch.zeros(batch, dtype=torch.float64)
    for b in range(batch):
        fractions = []
        for head in range(heads):
            kv = head // group
            for i in range(window):
                if not rows[b, i]:
                    continue
                position = length - window + i
                logits = [float(queries[b, head, i] @ keys[b, kv, j]) * scaling for j in range(position + 1)]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                probs = [w / sum(weights) for w in weights]
                for j in range(length - window):
                    scores[b, kv, j] += probs[j] / group
                fractions.append(sum(p < threshold * max(probs) for p in probs) / len(probs))
        sparsity[b] = sum(fractions) / len(fractions)
    return scores, sparsity


def test_post_vision_attention_matches_a_loop_over_heads_and_post_vision_rows():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 4, 5, 8, generator=generator, dtype=torch.float64) * 2
    keys = torch.randn(2, 2, 16, 8, generator=generator, dtype=torch.float64) * 2
    rows = torch.tensor([[True] * 5, [False, False, True, False, True]])
    scores, sparsity = post_vision_attention(queries, keys, rows, threshold=0.05, scaling=0.4)
    expected_scores, expected_sparsity = loop_post_vision(queries, keys, rows, 0.05, 0.4)
    assert torch.allclose(scores, expected_scores, atol=1e-12)
    assert torch.allclose(sparsity, expected_sparsity, atol=1e-12)
    assert float(sparsity.min()) > 0 and float(sparsity.max()) < 1


def test_post_vision_attention_is_minus_infinity_at_padding_and_refuses_bad_thresholds():
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(1, 2, 3, 4, generator=generator)
    keys = torch.randn(1, 2, 9, 4, generator=generator)
    key_mask = torch.ones(1, 9, dtype=torch.bool)
    key_mask[0, :2] = False
    rows = torch.ones(1, 3, dtype=torch.bool)
    scores, _ = post_vision_attention(queries, keys, rows, key_mask=key_mask)
    assert torch.isneginf(scores[..., :2]).all() and torch.isfinite(scores[..., 2:]).all()
    with pytest.raises(ValueError, match="threshold"):
        post_vision_attention(queries, keys, rows, threshold=1.0)


# -- layer budgets ------------------------------------------------------------------------------------
def allocate(densities, prefix_budget, available):
    """Run the running allocation over layers with the given densities ``(L,)`` for one sequence."""
    layers = len(densities)
    spent, density_sum, kept = 0, 0.0, []
    for rank, density in enumerate(densities):
        density_sum += density
        share = running_density_budget(
            torch.tensor([density]),
            torch.tensor([density_sum]),
            rank + 1,
            layers - rank,
            torch.tensor([layers * prefix_budget - spent]),
            torch.tensor([available]),
        )
        kept.append(int(share))
        spent += int(share)
    return kept


def test_equal_densities_give_every_layer_the_same_budget():
    assert allocate([0.3, 0.3, 0.3, 0.3], 10, 100) == [10, 10, 10, 10]


def test_a_denser_layer_gets_a_density_proportional_share_of_what_remains():
    kept = allocate([0.6, 0.2, 0.2], 10, 100)
    # Layer 0 sees only itself: the unseen layers are taken at its density, so it gets a third.
    assert kept[0] == 10
    # Layer 1: 20 remain for 2 layers, mean density so far 0.4: 20 * 0.2 / (0.2 + 0.4) = 6.67 -> 7.
    assert kept[1] == 7
    assert sum(kept) == 30  # the last layer takes what remains: the total is exact


def test_a_layer_holding_too_few_entries_passes_its_share_on():
    assert allocate([0.5, 0.5], 10, 4)[0] == 4
    assert sum(allocate([0.5, 0.5, 0.5], 10, 40)) == 30


# -- pivot merge --------------------------------------------------------------------------------------
def loop_pivot_merge(keys, values, kept, real):
    """LOOK-M's pivotal merge, entry by entry: kept ``(B, Hkv, N)`` bool."""
    out_k, out_v = keys.clone(), values.clone()
    batch, kv_heads, length, _ = keys.shape
    for b in range(batch):
        for h in range(kv_heads):
            targets = [t for t in range(length) if kept[b, h, t]]
            assigned = {t: [] for t in targets}
            for p in range(length):
                if kept[b, h, p] or not real[b, p]:
                    continue
                sims = [
                    float(torch.nn.functional.cosine_similarity(keys[b, h, p], keys[b, h, t], dim=0))
                    for t in targets
                ]
                assigned[targets[sims.index(max(sims))]].append(p)
            for t, evicted in assigned.items():
                if evicted:
                    for x, out in ((keys, out_k), (values, out_v)):
                        pairs = sum((x[b, h, p] + x[b, h, t]) / 2 for p in evicted)
                        out[b, h, t] = (x[b, h, t] + pairs) / (1 + len(evicted))
    return out_k, out_v


def test_pivot_merge_folds_each_evicted_entry_into_its_most_similar_kept_entry():
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 2, 10, 4, generator=generator, dtype=torch.float64)
    values = torch.randn(2, 2, 10, 3, generator=generator, dtype=torch.float64)
    real = torch.ones(2, 10, dtype=torch.bool)
    real[1, :2] = False  # padding is never merged
    kept_index = torch.tensor([[[1, 4, 8, 9], [0, 2, 8, 9]], [[3, 5, 8, 9], [6, 6, 8, 9]]])
    kept_valid = torch.ones(2, 2, 4, dtype=torch.bool)
    kept_valid[1, 1, 1] = False  # an unused slot repeating a kept position
    kept = torch.zeros(2, 2, 10, dtype=torch.bool)
    for b in range(2):
        for h in range(2):
            kept[b, h, kept_index[b, h][kept_valid[b, h]]] = True
    merged_k, merged_v = pivot_merge(keys, values, kept_index, kept_valid, real)
    expected_k, expected_v = loop_pivot_merge(keys, values, kept, real)
    assert torch.allclose(merged_k, expected_k, atol=1e-12)
    assert torch.allclose(merged_v, expected_v, atol=1e-12)
    assert not torch.equal(merged_v, values)  # something was merged


def test_pivot_merge_changes_nothing_when_nothing_is_evicted():
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 2, 5, 4, generator=generator, dtype=torch.bfloat16)
    values = torch.randn(1, 2, 5, 4, generator=generator, dtype=torch.bfloat16)
    index = torch.arange(5).expand(1, 2, 5)
    merged_k, merged_v = pivot_merge(
        keys, values, index, torch.ones(1, 2, 5, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool)
    )
    assert torch.equal(merged_k, keys) and torch.equal(merged_v, values)


# -- presses on a tiny VLM ------------------------------------------------------------------------------
@functools.cache
def llava():
    return build_case("llava")


def prefill(case, press=None):
    cache = DynamicCache(config=case.model.config)
    if press is None:
        case.model(**case.inputs, past_key_values=cache, use_cache=True)
        return cache
    with press(case.model):
        case.model(**case.inputs, past_key_values=cache, use_cache=True)
    return cache


class RecordingVLCache(mixkv.VLCachePress):
    """VL-Cache that keeps what each layer's context told it about visual tokens."""

    def scores(self, ctx):
        self.seen = [*getattr(self, "seen", []), ctx.visual_mask]
        return super().scores(ctx)


def test_vlm_presses_are_told_the_image_positions_of_the_prompt():
    case = llava()
    press = RecordingVLCache(budget=40, window_size=WINDOW)
    prefill(case, press)
    is_image = case.inputs["input_ids"] == case.image_token_id
    assert len(press.seen) == case.num_layers
    assert all(mask is not None and torch.equal(mask, is_image) for mask in press.seen)


def test_vlm_presses_are_told_no_image_positions_on_a_text_only_model():
    case = build_case("llama")
    press = RecordingVLCache(budget=40, window_size=WINDOW)
    prefill(case, press)
    assert press.seen and all(mask is None for mask in press.seen)


@pytest.mark.parametrize("budget", [40, 100])
def test_lookm_keeps_text_tokens_before_image_tokens(budget):
    case = llava()
    press = from_name("lookm", budget, window_size=WINDOW)
    prefill(case, press)
    report = press.last_report
    text = case.prompt_len - case.num_image_tokens
    # Every layer and head keeps min(text, budget) text tokens and fills the rest with image tokens.
    assert report.text_tokens_kept[0] == pytest.approx(min(text, budget))
    assert report.image_tokens_kept[0] == pytest.approx(max(0, budget - text))


def test_lookm_text_prior_is_a_bonus_on_text_scores():
    case = llava()
    scores = {}
    for prior in (True, False):
        press = mixkv.LookMPress(budget=40, window_size=WINDOW, text_prior=prior)
        captured = []
        original = press.scores
        press.scores = lambda ctx, original=original, captured=captured: (
            captured.append(original(ctx)) or captured[-1]
        )
        prefill(case, press)
        scores[prior] = captured[0]
    is_text = case.inputs["input_ids"][0, : scores[True].shape[-1]] != case.image_token_id
    assert torch.allclose(
        scores[True] - scores[False], TEXT_PRIOR_BONUS * is_text.float().expand_as(scores[True])
    )


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_lookm_cache_is_the_pivot_merge_of_the_full_cache_at_the_kept_positions(family):
    case = llava() if family == "llava" else build_case(family)
    layout = mixkv.integration.describe_decoder(case.model)
    full = prefill(case)
    unmerged_press = mixkv.LookMPress(budget=40, window_size=WINDOW, merge=False)
    unmerged = prefill(case, unmerged_press)
    merged_press = mixkv.LookMPress(budget=40, window_size=WINDOW)
    merged = prefill(case, merged_press)
    assert merged_press.last_report.kept_tokens.tolist() == unmerged_press.last_report.kept_tokens.tolist()
    for layer_idx in layout.compressible_layers:
        layer = merged.layers[layer_idx]
        assert isinstance(layer, CompressedLayer)
        keys, values = full.layers[layer_idx].keys, full.layers[layer_idx].values
        held_keys, held_values = layer.dense()
        assert held_keys.shape[2] == 40  # the cache holds the budget: memory is freed
        # Kept positions, in order, from the unmerged cache (whose keys are the original ones).
        plain_keys, _ = unmerged.layers[layer_idx].dense()
        index = (plain_keys[:, :, :, None, :] == keys[:, :, None, :, :]).all(-1).float().argmax(-1)
        expected_k, expected_v = pivot_merge(
            keys,
            values,
            index,
            torch.ones_like(index, dtype=torch.bool),
            torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool),
        )
        gather = index.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        assert torch.allclose(held_keys, expected_k.gather(2, gather), atol=1e-6)
        assert torch.allclose(held_values, expected_v.gather(2, gather), atol=1e-6)
        assert not torch.equal(held_values, values.gather(2, gather))  # merging changed kept values


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_lookm_budget_at_or_above_the_context_is_bit_identical_to_no_compression(family):
    case = llava() if family == "llava" else build_case(family)
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    reference = case.model.generate(**case.inputs, **kwargs)
    press = from_name("lookm", case.prompt_len, window_size=WINDOW)
    with press(case.model):
        out = case.model.generate(**case.inputs, **kwargs)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, reference.scores, strict=True))


@pytest.mark.parametrize("name", ["vlcache", "mixkv-vlcache", "lookm"])
def test_vlm_presses_generate_on_a_tiny_vlm_with_the_cache_at_the_budget(name):
    case = llava()
    press = from_name(name, 40, window_size=WINDOW)
    with press(case.model):
        out = case.model.generate(**case.inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == case.prompt_len + 3
    report = press.last_report
    kept = report.kept_tokens[:, list(report.compressed_layers)]
    assert report.compressed_layers and kept.float().mean().item() == 40
    assert report.compressed_bytes < report.full_bytes
    assert 0 <= report.image_tokens_kept[0] <= case.num_image_tokens


def test_mixkv_on_vlcache_ranks_by_the_mix_of_vlcache_scores():
    case = llava()
    vlcache = RecordingVLCache(budget=40, window_size=WINDOW)
    mixed = mixkv.MixKVPress(budget=40, window_size=WINDOW, base="vlcache")
    captured = []
    original = mixkv.functional.mixkv_scores

    def spy(*args, **kwargs):
        captured.append(kwargs["importance"])
        return original(*args, **kwargs)

    import mixkv.presses.mixkv as mixkv_module

    mixkv_module.mixkv_scores, saved = spy, mixkv_module.mixkv_scores
    try:
        prefill(case, mixed)
    finally:
        mixkv_module.mixkv_scores = saved
    vlcache_scores = []
    vlcache.scores = lambda ctx: (
        vlcache_scores.append(mixkv.VLCachePress.scores(vlcache, ctx)) or vlcache_scores[-1]
    )
    prefill(case, vlcache)
    assert len(captured) == len(vlcache_scores) == case.num_layers
    assert all(torch.equal(a, b) for a, b in zip(captured, vlcache_scores, strict=True))
    # Same layer budgets as VL-Cache's own.
    assert mixed.last_report.kept_tokens.tolist() == vlcache.last_report.kept_tokens.tolist()


def test_vlcache_refuses_a_threshold_outside_zero_one():
    with pytest.raises(ValueError, match="sparsity_threshold"):
        mixkv.VLCachePress(budget=40, sparsity_threshold=0.0)


def test_vlcache_layer_budgets_follow_the_measured_densities():
    case = llava()
    press = mixkv.VLCachePress(budget=40, window_size=WINDOW, sparsity_threshold=0.5)
    densities = []
    original = press.post_vision

    def measured(ctx):
        result = original(ctx)
        if len(densities) < ctx.layer_rank + 1:
            densities.append(1 - float(result[1][0]))
        return result

    press.post_vision = measured
    prefill(case, press)
    kept = press.last_report.kept_tokens[0, :, 0].tolist()
    prefix_available = case.prompt_len - WINDOW
    assert kept == [k + WINDOW for k in allocate(densities, 40 - WINDOW, prefix_available)]
    assert len(set(kept)) > 1  # a threshold of half the row maximum tells the layers apart


def test_vlcache_under_a_decoding_press_keeps_the_cache_bounded():
    case = llava()
    vlcache = mixkv.VLCachePress(budget=40, window_size=WINDOW, sparsity_threshold=0.5)
    press = mixkv.DecodingPress(vlcache, interval=4)
    with press(case.model):
        cache = DynamicCache(config=case.model.config)
        out = case.model.generate(**case.inputs, past_key_values=cache, max_new_tokens=16, do_sample=False)
    assert out.shape[1] == case.prompt_len + 16
    prompt_kept = vlcache.last_report.kept_tokens[0, :, 0]
    held = torch.tensor([int(layer.held_counts().max()) for layer in cache.layers])
    assert press.compressions > 0
    assert bool((held <= torch.maximum(prompt_kept, torch.tensor(40)) + 4).all())
