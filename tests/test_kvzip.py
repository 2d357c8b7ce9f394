"""KVzip: its score against a plain forward over context and repeat, and the press in a session.

The reference score is the eager attention of one ordinary forward over the context followed by the
repeat prompt: the most attention any repeat row pays a context column, over the query heads of the
column's KV group. The comparison with kvpress's own ``KVzipPress`` is in
``tests/test_kvzip_kvpress_reference.py`` (it needs kvpress and transformers 5.2).
"""

import json

import pytest
import torch
from transformers import DynamicCache

import mixkv
from mixkv.eval.cell_store import cell_filename
from mixkv.functional import adaptive_head_budgets, mixkv_mix, pooled_head_budgets, reconstruction_attention
from mixkv.integration import kvzip_prompt_ids
from mixkv.integration.cache import DenseCompressedLayer
from mixkv.presses.kvzip import RepeatChunk
from mixkv.presses.registry import build_press, from_name
from tests.families import LLM_FAMILIES, build_case
from tests.helpers_tiny import SIMPLE_CHAT_TEMPLATE, bpe_tokenizer, random_llama, word_tokenizer
from tests.reference import kept_positions

REPEAT = (1, 2, 3)
ANSWER = (4,)
LENGTH = 40


def llama(attn_implementation="eager", kv_heads=2):
    return random_llama(
        64,
        layers=2,
        kv_heads=kv_heads,
        seed=0,
        attn_implementation=attn_implementation,
        initializer_range=0.2,
    )


def context(seed=0, batch=1, length=LENGTH):
    return torch.randint(8, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def kvzip(budget=16, **options):
    options = {"window_size": 1, "repeat_prompt_ids": REPEAT, "answer_prefix_ids": ANSWER, **options}
    return mixkv.KVzipPress(budget=budget, **options)


class ScoreCapture(mixkv.KVzipPress):
    """KVzipPress that keeps the reconstruction scores each layer was compressed with."""

    seen: dict

    def scores(self, ctx):
        self.seen[ctx.layer_idx] = ctx.reconstruction_scores.clone()
        return super().scores(ctx)


def captured_scores(model, ids, **options):
    press = ScoreCapture(
        budget=16, window_size=1, repeat_prompt_ids=REPEAT, answer_prefix_ids=ANSWER, **options
    )
    press.seen = {}
    with torch.no_grad(), press(model):
        model(ids, past_key_values=DynamicCache(config=model.config))
    return press.seen


def plain_forward_scores(model, ids, repeat):
    """Max over the repeat rows and each KV group's query heads of the eager attention to the
    context columns, in one forward over context + repeat."""
    n = ids.shape[1]
    with torch.no_grad():
        out = model(torch.cat([ids, repeat], dim=1), output_attentions=True)
    kv_heads = model.config.num_key_value_heads
    scores = {}
    for layer, attention in enumerate(out.attentions):
        rows = attention[:, :, n:, :n]  # (1, H, T, N)
        grouped = rows.reshape(1, kv_heads, -1, rows.shape[2], n)
        scores[layer] = grouped.amax(dim=(2, 3))
    return scores


# -- the score ------------------------------------------------------------------------------------


def test_score_is_the_repeat_rows_max_attention_of_a_plain_eager_forward():
    model, ids = llama(), context()
    repeat = torch.tensor([[*REPEAT, *ANSWER]]).long()
    expected = plain_forward_scores(model, ids, torch.cat([repeat, ids], dim=1))
    scores = captured_scores(model, ids)
    assert sorted(scores) == [0, 1]
    for layer in (0, 1):
        torch.testing.assert_close(scores[layer], expected[layer], rtol=1e-5, atol=1e-6)


def test_later_chunk_softmax_covers_only_the_sinks_the_chunk_and_the_repeat_itself():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 5, 8, generator=g)
    ctx_keys = torch.randn(1, 2, 12, 8, generator=g)
    rep_keys = torch.randn(1, 2, 5, 8, generator=g)
    start, end, sink, scale = 6, 10, 2, 0.4
    expected = torch.zeros(1, 2, end - start)
    for h in range(4):
        kv = h // 2
        for t in range(5):
            columns = torch.cat(
                [ctx_keys[0, kv, :sink], ctx_keys[0, kv, start:end], rep_keys[0, kv, : t + 1]]
            )
            probs = (columns @ q[0, h, t] * scale).softmax(-1)[sink : sink + end - start]
            expected[0, kv] = torch.maximum(expected[0, kv], probs)
    got = reconstruction_attention(q, ctx_keys, rep_keys, start=start, end=end, n_sink=sink, scaling=scale)
    torch.testing.assert_close(got, expected)


def test_query_blocks_do_not_change_the_score():
    g = torch.Generator().manual_seed(2)
    q, ck = torch.randn(1, 4, 9, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g)
    rk = torch.randn(1, 2, 9, 8, generator=g)
    whole = reconstruction_attention(q, ck, rk)
    torch.testing.assert_close(reconstruction_attention(q, ck, rk, block_rows=2), whole)


def test_chunked_reconstruction_scores_each_chunk_with_its_own_repeat_forward():
    model, ids = llama(), context()
    press = kvzip(chunk_size=16, overlap=3, continue_prompt_ids=(5, 6))
    chunks = press.repeat_chunks(ids)
    assert [(c.start, c.end) for c in chunks] == [(0, 16), (16, 32), (32, 40)]
    assert chunks[1].ids.tolist()[0] == [5, 6, *ids[0, 13:16].tolist(), *ANSWER, *ids[0, 16:32].tolist()]
    scores = captured_scores(model, ids, chunk_size=16, overlap=3, continue_prompt_ids=(5, 6))
    # the second chunk, scored by hand: a forward over context + its repeat, restricted softmax
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        out = model(chunks[1].ids, past_key_values=cache, output_attentions=True)
    n, t = LENGTH, chunks[1].ids.shape[1]
    for layer in (0, 1):
        keys = cache.layers[layer].keys
        attention = out.attentions[layer]  # (1, H, T, N + T): the full softmax, for the logits' scale
        logits = attention.clamp_min(1e-30).log()  # log-softmax = logits - logsumexp (per row)
        columns = torch.cat([logits[..., :4], logits[..., 16:32], logits[..., n:]], dim=-1)
        causal = torch.ones(t, t).tril().bool()
        columns[..., 20:] = columns[..., 20:].masked_fill(~causal, float("-inf"))
        probs = columns.softmax(-1)[..., 4:20].reshape(1, 2, 2, t, 16).amax(dim=(2, 3))
        torch.testing.assert_close(scores[layer][..., 16:32], probs, rtol=1e-4, atol=1e-6)
        assert keys.shape[2] == n + t


# -- the press in a session -----------------------------------------------------------------------


def test_cache_holds_the_budget_of_prompt_entries_and_no_repeat_token():
    model, ids = llama("sdpa"), context()
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=full)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kvzip(budget=16)(model):
        model(ids, past_key_values=cache)
    assert cache.get_seq_length() == LENGTH
    for layer in (0, 1):
        held = cache.layers[layer]
        assert isinstance(held, DenseCompressedLayer)
        assert held.keys.shape[2] == 16
        # every held key is one of the prompt's own keys (a repeat token's would match none)
        assert kept_positions(held, full.layers[layer].keys).sum(-1).tolist() == [[16, 16]]


def test_prompt_logits_are_those_of_the_plain_prefill():
    model, ids = llama("sdpa"), context()
    with torch.no_grad():
        plain = model(ids).logits
        with kvzip(budget=16)(model):
            pressed = model(ids, past_key_values=DynamicCache(config=model.config)).logits
    assert torch.equal(plain, pressed)


def test_budget_not_below_the_prompt_gives_bit_identical_generation():
    model, ids = llama("sdpa"), context()
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        plain = model.generate(ids, **settings)
        press = kvzip(budget=LENGTH)
        with press(model):
            pressed = model.generate(ids, **settings)
    assert press.last_reconstruction_seconds is not None
    assert torch.equal(plain, pressed)


def test_sinks_are_always_kept():
    model, ids = llama("sdpa"), context()
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=full)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kvzip(budget=8, n_sink=4)(model):
        model(ids, past_key_values=cache)
    for layer in (0, 1):
        assert kept_positions(cache.layers[layer], full.layers[layer].keys)[..., :4].all()


def test_adakv_allocation_gives_each_head_its_adakv_share_of_the_kvzip_scores():
    model, ids = llama("sdpa", kv_heads=4), context()
    press = ScoreCapture(
        budget=8, window_size=1, repeat_prompt_ids=REPEAT, answer_prefix_ids=ANSWER, allocation="adakv"
    )
    press.seen = {}
    with torch.no_grad(), press(model):
        model(ids, past_key_values=DynamicCache(config=model.config))
    kept = press.last_report.kept_tokens[0]  # (layers, Hkv), window included
    for layer in (0, 1):
        scores = press.seen[layer][0, :, : LENGTH - 1].clone()
        scores[:, :4] = scores.max() + 1  # the sinks rank first
        expected = adaptive_head_budgets(scores, 8, 1, floor_ratio=0.2, mass_scaling=False)
        assert kept[layer].tolist() == expected.tolist()
        assert int(kept[layer].sum()) == 4 * 8
    assert kept.min() < kept.max()  # the heads' shares differ on this model


def test_global_allocation_keeps_the_best_entries_over_every_layer_and_head():
    model, ids = llama("sdpa", kv_heads=4), context(seed=1)
    press = ScoreCapture(
        budget=8, window_size=1, repeat_prompt_ids=REPEAT, answer_prefix_ids=ANSWER, allocation="global"
    )
    press.seen = {}
    with torch.no_grad(), press(model):
        model(ids, past_key_values=DynamicCache(config=model.config))
    kept = press.last_report.kept_tokens[0]  # (layers, Hkv), window included
    pooled = torch.stack([press.seen[layer][0, :, : LENGTH - 1] for layer in (0, 1)])  # (L, Hkv, P)
    pooled[..., :4] = 2.0  # the sinks rank first
    threshold = pooled.flatten().topk(2 * 4 * 7).values.min()
    assert kept.tolist() == ((pooled >= threshold).sum(-1) + 1).tolist()
    assert int(kept.sum()) == 2 * 4 * 8
    assert kept[0].sum() != kept[1].sum()  # the layers' shares differ on this model


# -- MixKV on KVzip's score ------------------------------------------------------------------------


def _kept(model, ids, press):
    full, cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=full)
        with press(model):
            model(ids, past_key_values=cache)
    return [kept_positions(cache.layers[i], full.layers[i].keys) for i in (0, 1)], full, press


def test_mixkv_on_kvzip_keeps_the_top_of_the_mix_of_kvzips_scores_in_each_head():
    model, ids = llama("sdpa"), context()
    seen = captured_scores(model, ids)
    options = {"window_size": 1, "repeat_prompt_ids": REPEAT, "answer_prefix_ids": ANSWER}
    kept, full, _ = _kept(model, ids, mixkv.MixKVKVzipPress(budget=16, **options))
    plain, _, _ = _kept(model, ids, kvzip(budget=16))
    for layer in (0, 1):
        importance = seen[layer][..., : LENGTH - 1]
        mixed = mixkv_mix(importance, full.layers[layer].keys, full.layers[layer].values, 1)
        mixed[..., :4] = float("inf")  # the sinks
        expected = torch.zeros(1, 2, LENGTH, dtype=torch.bool)
        expected.scatter_(-1, mixed.topk(15).indices, True)
        expected[..., -1] = True  # the window
        assert torch.equal(kept[layer], expected)
    assert any(not torch.equal(k, p) for k, p in zip(kept, plain, strict=True))  # the mix changed the choice


def test_mixkv_on_kvzip_global_fills_kvzip_globals_head_budgets_with_other_entries():
    model, ids = llama("sdpa", kv_heads=4), context(seed=1)
    options = {
        "window_size": 1,
        "repeat_prompt_ids": REPEAT,
        "answer_prefix_ids": ANSWER,
        "allocation": "global",
    }
    mixed, _, mixed_press = _kept(model, ids, mixkv.MixKVKVzipPress(budget=8, **options))
    plain, _, plain_press = _kept(model, ids, mixkv.KVzipPress(budget=8, **options))
    budgets = mixed_press.last_report.kept_tokens[0]
    assert budgets.tolist() == plain_press.last_report.kept_tokens[0].tolist()
    assert budgets.min() < budgets.max()  # the pooled layout, not a uniform one
    assert any(not torch.equal(m, p) for m, p in zip(mixed, plain, strict=True))


def test_mixkv_on_kvzip_refuses_a_path_without_reconstruction_by_name():
    model, ids = llama("sdpa"), context()
    press = mixkv.DecodingPress(mixkv.MixKVKVzipPress(budget=16, repeat_prompt_ids=REPEAT), interval=4)
    with pytest.raises(ValueError, match="MixKVKVzipPress"), press(model):
        model(ids, past_key_values=DynamicCache(config=model.config))


def test_pooled_head_budgets_count_each_heads_share_of_the_overall_top_entries():
    scores = torch.tensor([[[0.9, 0.1, 0.5], [0.8, 0.7, float("-inf")]], [[0.2, 0.3, 0.6], [0.05, 0.4, 0.0]]])
    assert pooled_head_budgets(scores, 5).tolist() == [[2, 2], [1, 0]]
    assert int(pooled_head_budgets(scores, 100).sum()) == 11  # finite entries only


def test_a_failing_reconstruction_leaves_the_prompts_cache_and_the_model_as_they_were():
    class FailingChunks(mixkv.KVzipPress):
        def repeat_chunks(self, context_ids):  # an empty chunk: the scoring refuses it in layer 0
            return [RepeatChunk(5, 5, torch.tensor([[*REPEAT, 9, 10]]))]

    model, ids = llama("sdpa"), context()
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=full)
    cache = DynamicCache(config=model.config)
    press = FailingChunks(budget=16, window_size=1, repeat_prompt_ids=REPEAT)
    with pytest.raises(ValueError, match="start < end"), torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
    assert cache.get_seq_length() == LENGTH
    for layer in (0, 1):
        assert torch.equal(cache.layers[layer].keys, full.layers[layer].keys)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert model.config._attn_implementation == "sdpa"


def test_session_without_repeat_prompt_ids_is_refused_and_leaves_the_model_as_it_was():
    model = llama("sdpa")
    press = mixkv.KVzipPress(budget=16)
    with pytest.raises(ValueError, match="repeat_prompt_ids"), press(model):
        pass
    assert model.config._attn_implementation == "sdpa"
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_batch_of_two_prompts_is_refused():
    model = llama("sdpa")
    with pytest.raises(ValueError, match=r"shape \(1, N\)"), torch.no_grad(), kvzip()(model):
        model(context(batch=2), past_key_values=DynamicCache(config=model.config))
    assert not model._forward_hooks


def test_decoding_press_is_refused():
    model = llama("sdpa")
    session = mixkv.DecodingPress(kvzip(), interval=8)(model)
    with pytest.raises(ValueError, match="DecodingPress"), session:
        pass


def test_continuous_batching_refuses_it_by_name():
    from mixkv.integration.paged_support import check_press

    with pytest.raises(ValueError, match=r"kvzip.*reconstruction"):
        check_press(kvzip())


@pytest.mark.parametrize(
    ("option", "value"),
    [("chunk_size", 0), ("n_sink", -1), ("allocation", "layerwise"), ("repeat_prompt_ids", "Repeat")],
)
def test_bad_options_are_refused(option, value):
    with pytest.raises(ValueError, match=option):
        kvzip(**{option: value})


def test_prompt_ids_of_a_tokenizer_without_chat_template_end_the_repeat_with_a_newline():
    tokenizer = word_tokenizer()
    ids = kvzip_prompt_ids(tokenizer)
    assert ids["answer_prefix_ids"] == tuple(tokenizer.encode("\n", add_special_tokens=False))
    assert ids["repeat_prompt_ids"] == tuple(
        tokenizer.encode("\n\nRepeat the previous context exactly.", add_special_tokens=False)
    )


def test_registry_name_builds_the_press_with_the_tokenizers_repeat_prompts():
    tokenizer = word_tokenizer()
    press = build_press("kvzip", 64, context_tokens=100, window_size=8, tokenizer=tokenizer)
    assert isinstance(press, mixkv.KVzipPress) and (press.budget, press.window_size) == (64, 8)
    assert press.repeat_prompt_ids == kvzip_prompt_ids(tokenizer)["repeat_prompt_ids"]
    assert from_name("kvzip", 64).repeat_prompt_ids is None  # refused when it enters a model


def test_prompt_ids_of_a_chat_tokenizer_end_the_repeat_with_the_switch_to_the_answer_turn():
    tokenizer = bpe_tokenizer()
    tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    ids = kvzip_prompt_ids(tokenizer)
    # the user turn closes with "\n", then the template opens the assistant's turn
    assert ids["answer_prefix_ids"] == tuple(tokenizer.encode("\n<|assistant|>\n", add_special_tokens=False))


def test_generate_under_the_press_decodes_like_a_manual_loop_over_the_compressed_cache():
    model, ids = llama("sdpa"), context()
    with torch.no_grad():
        press = kvzip(budget=16)
        with press(model):
            generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        cache = DynamicCache(config=model.config)
        tokens = []
        with kvzip(budget=16)(model):
            logits = model(ids, past_key_values=cache).logits[:, -1]
            for _ in range(6):
                tokens.append(int(logits.argmax(-1)))
                logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache).logits[:, -1]
    assert press.last_report.compressed_layers == [0, 1]
    assert generated[0, LENGTH:].tolist() == tokens


def _kvzip_cell(out, method, budget):
    return json.loads((out / "cells" / cell_filename(method, budget, "niah_single_1", 128)).read_text())


def _kvzip_grid(tiny, out, methods=("kvzip",), **settings):
    """Run a two-budget grid of ``methods``; the first method's cells by budget."""
    from mixkv.eval.runner import run_eval

    run_eval(
        tiny, methods=list(methods), budgets=[24, 40], tasks=["niah_single_1"], context_lengths=[128], n=2,
        max_new_tokens=4, window_size=8, out_dir=out, **settings,
    )  # fmt: skip
    return {budget: _kvzip_cell(out, methods[0], budget) for budget in (24, 40)}


def test_the_global_registry_name_is_kvzip_with_its_papers_layout():
    press = from_name("kvzip-global", 64)
    assert type(press) is mixkv.KVzipPress and press.allocation == "global"
    with pytest.raises(ValueError, match="allocation"):
        from_name("kvzip-global", 64, allocation="uniform")


@pytest.mark.parametrize(
    ("name", "allocation"), [("mixkv-kvzip", "uniform"), ("mixkv-kvzip-global", "global")]
)
def test_the_mixkv_registry_names_mix_kvzips_score_in_its_layouts(name, allocation):
    press = from_name(name, 64)
    assert type(press) is mixkv.MixKVKVzipPress and press.allocation == allocation


def _count_reconstructions(monkeypatch) -> list[tuple[int, ...]]:
    from mixkv.integration.session import PressSession

    reconstructed: list[tuple[int, ...]] = []
    real = PressSession._reconstruct

    def counted(self, press, cache, ids, embeddings):
        reconstructed.append(tuple(ids[0].tolist()))
        return real(self, press, cache, ids, embeddings)

    monkeypatch.setattr(PressSession, "_reconstruct", counted)
    return reconstructed


def test_eval_grid_runs_every_kvzip_method_from_one_reconstruction_per_prompt_at_equal_kv(
    tiny, tmp_path, monkeypatch
):
    reconstructed = _count_reconstructions(monkeypatch)
    out = tmp_path / "grid"
    uniform = _kvzip_grid(tiny, out, methods=("kvzip", "kvzip-global", "mixkv-kvzip", "mixkv-kvzip-global"))
    assert len(reconstructed) == len(set(reconstructed)) == 2  # 2 prompts, 4 methods x 2 budgets each
    for budget in (24, 40):
        pooled = _kvzip_cell(out, "kvzip-global", budget)
        assert pooled["kept_tokens_mean"] == uniform[budget]["kept_tokens_mean"] == float(budget)
        # the pooled layout is stored packed: the same entries plus its per-head bookkeeping
        for p, u in zip(pooled["examples"], uniform[budget]["examples"], strict=True):
            assert 0 < p["kv_bytes"] - u["kv_bytes"] <= 64
        # MixKV keeps its base layout's bytes
        for base, mixed in ((uniform[budget], "mixkv-kvzip"), (pooled, "mixkv-kvzip-global")):
            ours = _kvzip_cell(out, mixed, budget)["examples"]
            assert [r["kv_bytes"] for r in ours] == [r["kv_bytes"] for r in base["examples"]]


def test_eval_grid_runs_kvzip_from_the_shared_prefix_reconstructing_each_prompt_once(
    tiny, tmp_path, monkeypatch
):
    reconstructed = _count_reconstructions(monkeypatch)
    shared = _kvzip_grid(tiny, tmp_path / "shared")
    assert len(reconstructed) == len(set(reconstructed)) == 2  # 2 prompts, 2 budgets each
    for budget, cell in shared.items():
        assert cell["kept_tokens_mean"] == float(budget)
        assert all(0 < r["shared_prefix_tokens"] < r["prefill_tokens"] for r in cell["examples"])
    # The second budget reuses the scores, and its prefill seconds include what they took.
    assert all(r["prefill_seconds"] >= r["compression_seconds"] for r in shared[40]["examples"])
    one_go = _kvzip_grid(tiny, tmp_path / "one_go", share_prefill=False)
    assert len(reconstructed) == 4  # the one-go prefills reuse their reconstruction the same way
    for budget in (24, 40):
        assert all(r["shared_prefix_tokens"] == 0 for r in one_go[budget]["examples"])
        for key in ("output", "kv_bytes", "kept_tokens_mean"):
            assert [r[key] for r in shared[budget]["examples"]] == [
                r[key] for r in one_go[budget]["examples"]
            ]


def test_a_prompt_continuing_a_prefix_keeps_what_its_one_go_prefill_keeps():
    model, ids = llama("sdpa"), context()
    one_go = DynamicCache(config=model.config)
    with torch.no_grad(), kvzip(budget=16)(model):
        model(ids, past_key_values=one_go)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :30], past_key_values=cache)
        with kvzip(budget=16)(model) as session:
            session.declare_prompt(cache, ids)
            model(ids[:, 30:], past_key_values=cache)
    for layer in (0, 1):
        assert torch.allclose(cache.layers[layer].keys, one_go.layers[layer].keys, atol=1e-6)


def test_a_prefix_without_the_declared_prompt_is_refused():
    model, ids = llama("sdpa"), context()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :30], past_key_values=cache)
        with pytest.raises(ValueError, match="declare_prompt"), kvzip(budget=16)(model):
            model(ids[:, 30:], past_key_values=cache)


def test_presses_sharing_a_memo_reconstruct_a_prompt_once_and_keep_what_a_fresh_press_keeps():
    model, ids = llama("sdpa"), context()
    memo: dict = {}

    def compressed(press, prompt=ids):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), press(model):
            model(prompt, past_key_values=cache)
        return cache

    first = kvzip(budget=8, reconstruction_memo=memo)
    compressed(first)
    assert not first.last_reconstruction_reused and len(memo) == 1
    second = kvzip(budget=16, reconstruction_memo=memo)
    reused = compressed(second)
    assert second.last_reconstruction_reused
    assert second.last_reconstruction_seconds == first.last_reconstruction_seconds
    fresh = compressed(kvzip(budget=16))
    for layer in (0, 1):
        assert torch.equal(reused.layers[layer].keys, fresh.layers[layer].keys)
    other = kvzip(budget=16, reconstruction_memo=memo)
    compressed(other, context(seed=1))  # another prompt is reconstructed
    assert not other.last_reconstruction_reused and len(memo) == 2
    changed = kvzip(budget=16, reconstruction_memo=memo, chunk_size=16)  # other chunks: other scores
    compressed(changed)
    assert not changed.last_reconstruction_reused and len(memo) == 3


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_every_text_family_generates_as_without_press_at_a_budget_not_below_the_prompt(family):
    case = build_case(family)
    ids = case.inputs["input_ids"]
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": case.pad_token_id}
    press = mixkv.KVzipPress(budget=case.prompt_len, window_size=8, repeat_prompt_ids=(70, 71, 72))
    with torch.no_grad():
        plain = case.model.generate(ids, **settings)
        with press(case.model):
            pressed = case.model.generate(ids, **settings)
    assert press.last_reconstruction_seconds is not None  # the repeat ran, and left no trace
    assert torch.equal(plain, pressed)


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_every_text_family_holds_the_budget_in_its_full_attention_layers(family):
    case = build_case(family)
    ids = case.inputs["input_ids"]
    cache = DynamicCache(config=case.model.config)
    press = mixkv.KVzipPress(budget=48, window_size=8, repeat_prompt_ids=(70, 71, 72))
    with torch.no_grad(), press(case.model):
        case.model(ids, past_key_values=cache)
    compressed = press.last_report.compressed_layers
    assert compressed  # every family has full-attention layers
    for layer_idx in compressed:
        assert isinstance(cache.layers[layer_idx], DenseCompressedLayer)
        assert cache.layers[layer_idx].keys.shape[2] == 48
    assert cache.get_seq_length(compressed[0]) == case.prompt_len
