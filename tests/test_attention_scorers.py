"""TOVA, ExpectedAttention and MixKV on them: their scores against the formulas, and the presses.

The formulas are written here the plain way (loops, explicit matrices) on small random tensors; the
presses run on the press API's tiny Llama. The comparison with kvpress's own presses is in
``tests/test_kvpress_scorer_reference.py`` (it needs kvpress).
"""

import math

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import mixkv
from mixkv.functional import (
    expected_attention,
    future_rotary,
    last_query_attention,
    mixkv_mix,
    mixkv_scores,
    unrotate_queries,
    window_importance,
)
from mixkv.presses.registry import from_name
from tests.helpers_tiny import press_test_llama
from tests.reference import kept_positions

WINDOW = 8
BUDGET = 40
NAMES = ("tova", "mixkv-tova", "expectedattention", "mixkv-expectedattention")


def tensors(seed=0, batch=1, heads=4, kv_heads=2, length=20, dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=torch.float64)
    return q, k, v


def rope_tables(positions, dim, base=100.0, scale=1.0):
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = positions.to(torch.float64)[:, None] * inv_freq
    emb = torch.cat([angle, angle], -1)[None]
    return scale * emb.cos(), scale * emb.sin(), inv_freq


# -- TOVA ---------------------------------------------------------------------------------------


def test_tova_score_is_the_last_querys_attention_averaged_over_every_query_head():
    q, k, _ = tensors()
    scale = 0.3
    probs = (torch.einsum("hd,hnd->hn", q[0, :, -1], k[0].repeat_interleave(2, 0)) * scale).softmax(-1)
    expected = probs.mean(0)[:-WINDOW]
    scores = last_query_attention(q[:, :, -WINDOW:], k, WINDOW, scaling=scale)
    for head in range(2):
        torch.testing.assert_close(scores[0, head], expected)


def test_tova_per_head_averages_over_each_kv_heads_query_group():
    q, k, _ = tensors()
    probs = (torch.einsum("hd,hnd->hn", q[0, :, -1], k[0].repeat_interleave(2, 0)) / math.sqrt(8)).softmax(-1)
    scores = last_query_attention(q[:, :, -1:], k, WINDOW, per_head=True)
    torch.testing.assert_close(scores[0], probs.reshape(2, 2, -1).mean(1)[:, :-WINDOW])


def test_tova_score_of_a_left_padded_row_equals_the_row_alone():
    q, k, _ = tensors(length=20)
    padded_k = torch.cat([torch.randn(1, 2, 5, 8, dtype=torch.float64), k], 2)
    mask = torch.ones(1, 25, dtype=torch.bool)
    mask[:, :5] = False
    padded = last_query_attention(q[:, :, -1:], padded_k, WINDOW, key_mask=mask)
    assert torch.isneginf(padded[..., :5]).all()
    torch.testing.assert_close(padded[..., 5:], last_query_attention(q[:, :, -1:], k, WINDOW))


# -- rotary tables ------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1.3], ids=["plain", "attention-scaling"])
def test_unrotate_queries_inverts_transformers_rotary_embedding(scale):
    q, _, _ = tensors()
    cos, sin, _ = rope_tables(torch.arange(3, 23), 8, scale=scale)
    rotated, _ = apply_rotary_pos_emb(q, q, cos, sin)
    torch.testing.assert_close(unrotate_queries(rotated, cos, sin), q)


def test_unrotate_queries_leaves_the_dims_past_a_partial_rotary_alone():
    q, _, _ = tensors()
    cos, sin, _ = rope_tables(torch.arange(20), 4)
    rotated = torch.cat([apply_rotary_pos_emb(q[..., :4], q[..., :4], cos, sin)[0], q[..., 4:]], -1)
    torch.testing.assert_close(unrotate_queries(rotated, cos, sin), q)


def test_future_rotary_continues_the_positions_after_the_last_one():
    cos, sin, inv_freq = rope_tables(torch.arange(40, 60), 8, scale=1.2)
    future_cos, future_sin = future_rotary(cos[:, -1], sin[:, -1], inv_freq, 7)
    expected_cos, expected_sin, _ = rope_tables(torch.arange(60, 67), 8, scale=1.2)
    torch.testing.assert_close(future_cos, expected_cos)
    torch.testing.assert_close(future_sin, expected_sin)


# -- ExpectedAttention --------------------------------------------------------------------------


def reference_expected_attention(pre_q, k, v, future_cos, future_sin, window, n_sink, scale, covariance=True):
    """ExpectedAttention on one sequence, written out: Gaussian of the queries, averaged rotation matrix."""
    heads, _, dim = pre_q.shape[1:]
    group = heads // k.shape[1]
    rotation = torch.zeros(dim, dim, dtype=torch.float64)
    for c, s in zip(future_cos[0], future_sin[0], strict=True):
        matrix = torch.diag(c)
        for i in range(dim // 2):
            matrix[i, i + dim // 2] = -s[i]
            matrix[i + dim // 2, i] = s[i + dim // 2]
        rotation += matrix / future_cos.shape[1]
    n = k.shape[2]
    attention = torch.zeros(k.shape[1], n - n_sink, dtype=torch.float64)
    for h in range(heads):
        x = pre_q[0, h]
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / x.shape[0]
        mu, sigma = rotation @ mean, rotation @ cov @ rotation.T
        keys = k[0, h // group, n_sink:]
        logits = scale * keys @ mu
        if covariance:
            logits = logits + scale**2 / 2 * torch.einsum("ni,ij,nj->n", keys, sigma, keys)
        attention[h // group] += logits.softmax(-1) / group
    score = attention * v[0, :, n_sink:].norm(dim=-1)
    return score[:, : n - n_sink - window]


@pytest.mark.parametrize("covariance", [True, False])
def test_expected_attention_equals_the_gaussian_formula_written_out(covariance):
    q, k, v = tensors(length=30)
    cos, sin, _ = rope_tables(torch.arange(30, 42), 8)
    scores = expected_attention(
        q[:, :, -10:], k, v, cos, sin, WINDOW, n_sink=3, use_covariance=covariance, scaling=0.4
    )
    expected = reference_expected_attention(q[:, :, -10:], k, v, cos, sin, WINDOW, 3, 0.4, covariance)
    torch.testing.assert_close(scores[0, :, 3:], expected)


def test_expected_attention_keeps_the_sinks_above_every_other_position():
    q, k, v = tensors(length=30)
    cos, sin, _ = rope_tables(torch.arange(30, 42), 8)
    scores = expected_attention(q[:, :, -10:], k, v, cos, sin, WINDOW, n_sink=3)
    assert (scores[..., :3].amin(-1) > scores[..., 3:].amax(-1)).all()


def test_expected_attention_sinks_are_the_first_real_tokens_of_a_left_padded_row():
    q, k, v = tensors(length=30)
    pad = torch.zeros(1, 2, 4, 8, dtype=torch.float64)
    mask = torch.ones(1, 34, dtype=torch.bool)
    mask[:, :4] = False
    cos, sin, _ = rope_tables(torch.arange(30, 42), 8)
    padded = expected_attention(
        q[:, :, -10:], torch.cat([pad, k], 2), torch.cat([pad, v], 2), cos, sin, WINDOW, key_mask=mask
    )
    alone = expected_attention(q[:, :, -10:], k, v, cos, sin, WINDOW)
    assert torch.isneginf(padded[..., :4]).all()
    torch.testing.assert_close(padded[..., 4:], alone)


def test_expected_attention_leaves_padded_queries_out_of_the_gaussian():
    q, k, v = tensors(length=30)
    cos, sin, _ = rope_tables(torch.arange(30, 42), 8)
    query_mask = torch.ones(1, 10, dtype=torch.bool)
    query_mask[:, :3] = False
    masked = expected_attention(q[:, :, -10:], k, v, cos, sin, WINDOW, query_mask=query_mask)
    torch.testing.assert_close(masked, expected_attention(q[:, :, -7:], k, v, cos, sin, WINDOW))


# -- the MixKV mix on another importance --------------------------------------------------------


def test_mixkv_mix_on_snapkv_importance_is_mixkvs_score():
    q, k, v = tensors(length=30)
    importance = window_importance(q[:, :, -WINDOW:], k)
    torch.testing.assert_close(
        mixkv_mix(importance, k, v, WINDOW), mixkv_scores(q[:, :, -WINDOW:], k, v, window_size=WINDOW)
    )


def test_mixkv_mix_of_a_head_without_redundancy_ranks_by_importance_plus_value_norm():
    q, k, v = tensors(length=30)
    importance = last_query_attention(q[:, :, -1:], k, WINDOW)
    mixed = mixkv_mix(importance, k, v, WINDOW, redundancy=torch.zeros(2, dtype=torch.float64))
    norms = v[..., :-WINDOW, :].norm(dim=-1)
    minmax = (norms - norms.amin(-1, keepdim=True)) / (
        norms.amax(-1, keepdim=True) - norms.amin(-1, keepdim=True)
    )
    target = importance.mean(-1, keepdim=True)
    torch.testing.assert_close(mixed, importance + minmax * target / (minmax.mean(-1, keepdim=True) + 1e-8))


# -- the presses on a tiny Llama ----------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return press_test_llama()


def prompt(length=120, seed=1):
    return torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_the_press_frees_memory_down_to_its_budget(model, name):
    press = from_name(name, BUDGET, window_size=WINDOW)
    cache = DynamicCache(config=model.config)
    with press(model):
        model(prompt(), past_key_values=cache)
    assert all(layer.keys.shape[2] == BUDGET for layer in cache.layers)
    assert mixkv.kv_cache_bytes(cache) == 3 * 2 * BUDGET * 2 * 16 * 4
    assert press.last_report.compressed_bytes == mixkv.kv_cache_bytes(cache)


@pytest.mark.parametrize("name", NAMES)
def test_a_budget_at_or_above_the_context_gives_the_full_cache_outputs_bit_for_bit(model, name):
    ids = prompt(60)
    full = model.generate(ids, max_new_tokens=6, do_sample=False)
    for budget in (60, 100):
        with from_name(name, budget, window_size=WINDOW)(model):
            assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), full)


@pytest.mark.parametrize("name", ["tova", "expectedattention"])
def test_kept_entries_are_the_best_scored_ones(model, name):
    ids = prompt()
    full = DynamicCache(config=model.config)
    model(ids, past_key_values=full)
    press = from_name(name, BUDGET, window_size=WINDOW)
    seen = {}
    original = press.scores

    def recording(ctx):
        seen[ctx.layer_idx] = original(ctx)
        return seen[ctx.layer_idx]

    object.__setattr__(press, "scores", recording)
    cache = DynamicCache(config=model.config)
    with press(model):
        model(ids, past_key_values=cache)
    for layer_idx, scores in seen.items():
        kept = kept_positions(cache.layers[layer_idx], full.layers[layer_idx].keys)
        for h in range(2):
            expected = torch.zeros(120, dtype=torch.bool)
            expected[torch.argsort(scores[0, h], descending=True, stable=True)[: BUDGET - WINDOW]] = True
            expected[-WINDOW:] = True
            assert torch.equal(kept[0, h], expected)


def test_expected_attention_fits_the_gaussian_on_the_models_own_pre_rotary_queries(model):
    ids = prompt()
    hidden = {}
    handles = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: hidden.__setitem__(i, kwargs["hidden_states"]), with_kwargs=True
        )
        for i, layer in enumerate(model.model.layers)
    ]
    press = mixkv.ExpectedAttentionPress(budget=BUDGET, window_size=WINDOW, n_future_positions=16)
    seen = {}
    original = press.scores
    object.__setattr__(press, "scores", lambda ctx: seen.setdefault(ctx.layer_idx, (ctx, original(ctx)))[1])
    try:
        with press(model):
            model(ids, past_key_values=DynamicCache(config=model.config))
    finally:
        for handle in handles:
            handle.remove()
    future_cos, future_sin = model.model.rotary_emb(hidden[0], torch.arange(120, 136)[None])
    for layer_idx, (ctx, scores) in seen.items():
        attn = model.model.layers[layer_idx].self_attn
        pre_q = attn.q_proj(hidden[layer_idx][:, -WINDOW:]).view(1, WINDOW, 4, 16).transpose(1, 2)
        torch.testing.assert_close(
            unrotate_queries(ctx.queries, *ctx.query_rotary), pre_q, atol=1e-5, rtol=1e-4
        )
        expected = expected_attention(
            pre_q, ctx.keys, ctx.values, future_cos, future_sin, WINDOW, scaling=ctx.scaling
        )
        torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-4)


def test_expected_attention_under_chunked_prefill_stays_bounded(model):
    press = mixkv.ExpectedAttentionPress(budget=BUDGET, window_size=WINDOW)
    cache = DynamicCache(config=model.config)
    ids = prompt(150)
    with press(model) as session, session.chunked_prefill():
        for start in range(0, 150, 5):  # chunks shorter than the window join the previous queries
            model(ids[:, start : start + 5], past_key_values=cache)
            assert cache.layers[0].keys.shape[2] <= BUDGET + 5
    assert press.last_report.context_lengths == [150]


@pytest.mark.parametrize("name", ["expectedattention", "mixkv-tova"])
def test_a_replayed_recording_keeps_what_the_press_own_prefill_keeps(model, name):
    ids = prompt()
    press = from_name(name, BUDGET, window_size=WINDOW)
    own = DynamicCache(config=model.config)
    with press(model):
        model(ids, past_key_values=own)
    recorder = mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW)
    with recorder(model) as session, session.recording_prompt() as recorded:
        model(ids, past_key_values=DynamicCache(config=model.config))
    with press(model) as session:
        replayed = session.compress_recorded(recorded)
    for mine, theirs in zip(own.layers, replayed.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys)


def test_mixkv_on_expected_attention_keeps_the_sinks(model):
    ids = prompt()
    full = DynamicCache(config=model.config)
    model(ids, past_key_values=full)
    cache = DynamicCache(config=model.config)
    with mixkv.MixKVExpectedAttentionPress(budget=BUDGET, window_size=WINDOW)(model):
        model(ids, past_key_values=cache)
    for layer, full_layer in zip(cache.layers, full.layers, strict=True):
        assert kept_positions(layer, full_layer.keys)[..., :4].all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_future_positions": 0}, "n_future_positions"),
        ({"n_sink": -1}, "n_sink"),
        ({"epsilon": -0.1}, "epsilon"),
    ],
)
def test_bad_expected_attention_arguments_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mixkv.ExpectedAttentionPress(budget=64, **kwargs)


def test_expected_attention_under_a_decoding_press_keeps_the_cache_bounded_while_generating(model):
    bounded = mixkv.DecodingPress(mixkv.ExpectedAttentionPress(budget=BUDGET, window_size=WINDOW), interval=8)
    cache = DynamicCache(config=model.config)
    with bounded(model):
        model.generate(prompt(), past_key_values=cache, max_new_tokens=30, do_sample=False)
    assert bounded.compressions >= 3 * 3  # every layer compressed again while decoding
    assert all(layer.keys.shape[2] < BUDGET + 8 for layer in cache.layers)
