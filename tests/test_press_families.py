"""Every press on every supported family (tiny random models, real image inputs for VLMs)."""

import functools

import pytest
import torch
from transformers import DynamicCache

import mixkv
from mixkv.integration.cache import CompressedLayer
from mixkv.presses.registry import build_press
from tests.families import ALL_FAMILIES, VLM_FAMILIES, build_case
from tests.reference import kept_positions, masked_reference

WINDOW = 8
BUDGET = 40
PRESS_NAMES = (
    "snapkv",
    "pyramidkv",
    "adakv",
    "sparsemm",
    "keydiff",
    "knorm",
    "streamingllm",
    "random",
    "mixkv-snapkv",
    "mixkv-pyramidkv",
    "mixkv-adakv",
    "mixkv-sparsemm",
    "tova",
    "mixkv-tova",
    "expectedattention",
    "mixkv-expectedattention",
    "vlcache",
    "mixkv-vlcache",
)


def make_press(name, case, budget):
    layout = mixkv.integration.describe_decoder(case.model)
    head_scores = torch.rand(layout.num_layers, layout.num_heads, generator=torch.Generator().manual_seed(7))
    return build_press(
        name, budget, context_tokens=case.prompt_len, window_size=WINDOW, head_scores=head_scores
    )


@functools.cache
def cached_case(family, attn_implementation="sdpa"):
    return build_case(family, attn_implementation=attn_implementation)


@functools.cache
def full_cache_generation(family):
    case = cached_case(family)
    return case.model.generate(
        **case.inputs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True
    )


@pytest.mark.parametrize("press_name", PRESS_NAMES)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_budget_at_or_above_context_is_bit_identical_to_no_compression(family, press_name):
    case = cached_case(family)
    reference = full_cache_generation(family)
    press = make_press(press_name, case, budget=case.prompt_len)
    with press(case.model):
        out = case.model.generate(
            **case.inputs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    assert torch.equal(out.sequences, reference.sequences)
    for got, expected in zip(out.scores, reference.scores, strict=True):
        assert torch.equal(got, expected)
    assert press.last_report.compressed_layers == []  # nothing was compressed, and the report says so
    assert press.last_report.compressed_bytes == press.last_report.full_bytes


def prefill(case):
    cache = DynamicCache(config=case.model.config)
    case.model(**case.inputs, past_key_values=cache, use_cache=True)
    return cache


def check_compressed_cache(layout, press, full, compressed):
    """Kept counts follow the budgets, attention equals masked full attention, bytes are physical."""
    report = press.last_report
    assert report is not None and report.compressed_layers
    group = layout.num_heads // layout.num_kv_heads
    kept_entries = 0
    for layer_idx in report.compressed_layers:
        layer = compressed.layers[layer_idx]
        assert isinstance(layer, CompressedLayer)
        full_keys, full_values = full.layers[layer_idx].keys, full.layers[layer_idx].values
        kept = kept_positions(layer, full_keys)
        assert torch.equal(kept.sum(-1), report.kept_tokens[:, layer_idx])
        assert kept[..., -WINDOW:].all()  # the observation window is always kept
        kept_entries += int(kept.sum())
        # Attention of a new token over the compressed layer == over the full one with drops masked.
        generator = torch.Generator().manual_seed(layer_idx)
        batch, kv_heads, _, head_dim = full_keys.shape
        new_k = torch.randn(batch, kv_heads, 1, head_dim, generator=generator)
        new_v = torch.randn(batch, kv_heads, 1, head_dim, generator=generator)
        query = torch.randn(batch, kv_heads * group, 1, head_dim, generator=generator)
        layer.update(new_k, new_v)
        visible = torch.cat([kept, torch.ones(batch, kv_heads, 1, dtype=torch.bool)], -1).unsqueeze(2)
        expected = masked_reference(
            query, torch.cat([full_keys, new_k], 2), torch.cat([full_values, new_v], 2), visible, 0.3
        )
        assert (layer.attend(query, 0.3) - expected).abs().max() <= 1e-5
    # Budgets: every full-attention layer is compressed and the mean over them is exactly the budget.
    assert tuple(report.compressed_layers) == layout.compressible_layers
    kept_tokens = report.kept_tokens[:, report.compressed_layers]
    assert kept_tokens.sum().item() == BUDGET * kept_tokens.numel()
    # Physical bytes: compressed layers hold kept entries (+1 decoded token each here) and <2% bookkeeping.
    entry_bytes = 2 * head_dim * full_keys.element_size()
    held = sum(mixkv.integration.cache.layer_bytes(compressed.layers[i]) for i in report.compressed_layers)
    payload = (kept_entries + len(report.compressed_layers) * batch * kv_heads) * entry_bytes
    assert payload <= held <= 1.02 * payload


@pytest.mark.parametrize("press_name", PRESS_NAMES)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_compressed_cache_holds_budgeted_entries_and_attends_like_masked_full_cache(family, press_name):
    case = cached_case(family)
    press = make_press(press_name, case, budget=BUDGET)
    layout = mixkv.integration.describe_decoder(case.model)
    full = prefill(case)
    with press(case.model):
        check_compressed_cache(layout, press, full, prefill(case))


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("press_name", ["snapkv", "mixkv-adakv"])
def test_eager_attention_is_supported_for_uniform_and_headwise_layouts(family, press_name):
    case = cached_case(family, "eager")
    press = make_press(press_name, case, budget=BUDGET)
    layout = mixkv.integration.describe_decoder(case.model)
    full = prefill(case)
    with press(case.model):
        check_compressed_cache(layout, press, full, prefill(case))
    with press(case.model):
        out = case.model.generate(**case.inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == case.prompt_len + 3


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_compressed_generation_decodes_and_reports_memory_saved(family):
    case = cached_case(family)
    press = make_press("mixkv-adakv", case, budget=BUDGET)
    with press(case.model):
        out = case.model.generate(**case.inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == case.prompt_len + 4
    report = press.last_report
    assert report is not None
    assert report.compressed_bytes < report.full_bytes


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_report_counts_image_and_text_tokens(family):
    case = cached_case(family)
    press = make_press("mixkv-snapkv", case, budget=BUDGET)
    with press(case.model):
        prefill(case)
    report = press.last_report
    assert report is not None
    assert report.image_tokens_total == [case.num_image_tokens]
    assert report.text_tokens_total == [case.prompt_len - case.num_image_tokens]
    assert report.image_tokens_kept is not None and report.text_tokens_kept is not None
    kept_mean = report.kept_tokens[:, report.compressed_layers].float().mean().item()
    assert report.image_tokens_kept[0] + report.text_tokens_kept[0] == pytest.approx(kept_mean)
    assert 0 <= report.image_tokens_kept[0] <= case.num_image_tokens


@pytest.mark.parametrize("family", VLM_FAMILIES)
@pytest.mark.parametrize("press_name", ["snapkv", "mixkv-adakv"])
def test_vlm_report_keep_fractions_per_position_add_up_to_the_kept_counts(family, press_name):
    case = cached_case(family)
    press = make_press(press_name, case, budget=BUDGET)
    with press(case.model):
        prefill(case)
    report = press.last_report
    fraction = report.position_keep_fraction
    assert fraction is not None and fraction.shape == (1, case.prompt_len)
    assert bool(((fraction >= 0) & (fraction <= 1 + 1e-6)).all())
    assert torch.allclose(fraction[0, -press.window_size :], torch.ones(press.window_size))
    is_image = case.inputs["input_ids"][0] == case.image_token_id
    assert fraction[0, is_image].sum().item() == pytest.approx(report.image_tokens_kept[0], rel=1e-5)
    kept_mean = report.kept_tokens[:, report.compressed_layers].float().mean().item()
    assert fraction.sum().item() == pytest.approx(kept_mean, rel=1e-5)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("press_name", ["snapkv", "mixkv-adakv"])
def test_left_padded_batch_generates_like_each_sequence_alone(family, press_name):
    case = build_case(family, batch_size=2, left_pad=5)
    press = make_press(press_name, case, budget=BUDGET)
    with press(case.model):
        batched = case.model.generate(**case.inputs, max_new_tokens=3, do_sample=False)[:, -3:]
        batch_kept = press.last_report.kept_tokens.clone()
        alone, kept_alone = [], []
        for row in case.rows:
            alone.append(case.model.generate(**row, max_new_tokens=3, do_sample=False)[0, -3:])
            kept_alone.append(press.last_report.kept_tokens[0])
    assert torch.equal(batched, torch.stack(alone))
    assert torch.equal(batch_kept, torch.stack(kept_alone))


def pre_rotary_queries(module, hidden):
    """The queries ``module`` computes from ``hidden`` before its rotary embedding ``(B, H, L, D)``."""
    batch, length, _ = hidden.shape
    if hasattr(module, "q_proj"):
        query = module.q_proj(hidden)
    else:  # Phi-3: one fused projection, queries first
        query = module.qkv_proj(hidden)[..., : module.config.num_attention_heads * module.head_dim]
    query = query.view(batch, length, -1, module.head_dim)
    if hasattr(module, "q_norm"):
        query = module.q_norm(query)
    return query.transpose(1, 2)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_expected_attention_un_rotates_the_window_to_the_models_own_pre_rotary_queries(family):
    case = cached_case(family)
    layout = mixkv.integration.describe_decoder(case.model)
    hidden = {}
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: hidden.__setitem__(i, kwargs["hidden_states"]), with_kwargs=True
        )
        for i, module in enumerate(layout.attention_modules)
    ]
    press = make_press("expectedattention", case, BUDGET)
    seen = {}
    original = press.scores
    object.__setattr__(press, "scores", lambda ctx: seen.setdefault(ctx.layer_idx, ctx) and original(ctx))
    try:
        with press(case.model):
            case.model(**case.inputs, past_key_values=DynamicCache(config=case.model.config))
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(seen) == list(layout.compressible_layers)
    for layer_idx, ctx in seen.items():
        expected = pre_rotary_queries(layout.attention_modules[layer_idx], hidden[layer_idx][:, -WINDOW:])
        got = mixkv.functional.unrotate_queries(ctx.queries, *ctx.query_rotary)
        torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-3)
