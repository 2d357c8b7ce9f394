"""kvpress's scorer presses as mixkv importance (``<method>@kvpress-<scorer>``).

Runs where kvpress is installed (CI: the transformers 5.2 stage of ``scripts/test.sh``). The
reference is kvpress itself: the scores mixkv obtains equal those kvpress's own forward hook
computes on the same prompt, and where kvpress keeps the window (SnapKV, TOVA) the kept entries are
kvpress's own.
"""

from __future__ import annotations

import os

import pytest
import torch

kvpress = pytest.importorskip("kvpress")

from transformers import DynamicCache  # noqa: E402

from mixkv import kv_cache_bytes  # noqa: E402
from mixkv.presses.kvpress_scorers import KvpressScorerPress, kvpress_scorer_names  # noqa: E402
from mixkv.presses.registry import from_name, kvpress_scorer_press_names  # noqa: E402
from tests.families import build_case  # noqa: E402
from tests.helpers_tiny import grid_run_twice, press_test_llama, random_llama  # noqa: E402

PROMPT = 100
BUDGET = 40
WINDOW = 8


@pytest.fixture(scope="module")
def model():
    return press_test_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))


def _compress(model, press, inputs):
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(**inputs, past_key_values=cache)
    return cache


def _full_keys(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return [layer.keys for layer in cache.layers]


def _positions(kept, full):
    """Positions ``(B, Hkv, K)`` in ``full`` ``(B, Hkv, N, D)`` of the kept key vectors, ascending."""
    match = (kept[:, :, :, None, :] == full[:, :, None, :, :]).all(-1)
    assert bool((match.sum(-1) == 1).all()), "every kept key is one prompt position's"
    return match.float().argmax(-1).sort(-1).values


def _recording_scores(press):
    """Make ``press`` (a kvpress scorer) record every score it returns; returns the list."""
    scores = []
    score = press.score

    def recorded(*args, **kwargs):
        out = score(*args, **kwargs)
        scores.append(out.detach().clone())
        return out

    press.score = recorded
    return scores


def _kvpress_options(name):
    return {"window_size": WINDOW} if name == "snapkv" else {}


def test_the_scorers_are_found_in_the_installed_kvpress():
    names = kvpress_scorer_names()
    assert {"knorm", "tova", "expectedattention", "keydiff", "snapkv", "observedattention"} <= set(names)
    # not scorers, or scorers deciding their own budgets, or wrappers of another press
    assert not {"think", "duoattention", "kvzip", "adakv", "pyramidkv", "criticalkv"} & set(names)
    assert "adakv@kvpress-tova" in kvpress_scorer_press_names()


@pytest.mark.parametrize("scorer", ["knorm", "tova", "expectedattention", "keydiff", "snapkv"])
def test_scores_equal_those_of_kvpress_own_run(model, ids, scorer):
    press = from_name(f"snapkv@kvpress-{scorer}", budget=BUDGET, window_size=WINDOW)
    ours = _recording_scores(press._kvpress_press)
    _compress(model, press, {"input_ids": ids})
    # kvpress's run on a fresh model: kvpress sets a rotary_emb attribute on the modules for good
    reference = type(press._kvpress_press)(compression_ratio=0.5, **_kvpress_options(scorer))
    theirs = _recording_scores(reference)
    fresh = press_test_llama()
    with torch.no_grad(), reference(fresh):
        fresh(ids, past_key_values=DynamicCache(config=fresh.config))
    assert len(ours) == len(theirs) == model.config.num_hidden_layers
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("scorer", "window"), [("snapkv", WINDOW), ("tova", 1)])
def test_kept_entries_equal_kvpress_own_run(model, ids, scorer, window):
    """SnapKV and TOVA rank their window first, so kvpress keeps it too and the selections agree."""
    ratio = 1 - BUDGET / PROMPT
    assert kvpress.utils.compute_n_kept(PROMPT, ratio) == BUDGET
    ours = _compress(
        model, from_name(f"snapkv@kvpress-{scorer}", budget=BUDGET, window_size=window), {"input_ids": ids}
    )
    options = {"window_size": window} if scorer == "snapkv" else {}
    reference = type(from_name(f"snapkv@kvpress-{scorer}", budget=BUDGET)._kvpress_press)(
        compression_ratio=ratio, **options
    )
    fresh = press_test_llama()
    theirs = DynamicCache(config=fresh.config)
    with torch.no_grad(), reference(fresh):
        fresh(ids, past_key_values=theirs)
    for full, our_layer, their_layer in zip(_full_keys(model, ids), ours.layers, theirs.layers, strict=True):
        our_keys, _ = our_layer.dense()
        assert torch.equal(_positions(our_keys, full), _positions(their_layer.keys, full))


def test_knorm_through_kvpress_keeps_what_mixkv_knorm_keeps(model, ids):
    """Knorm's score is negative (``-||k||``) and shifted: the ranking, hence the cache, is unchanged."""
    ours = _compress(
        model, from_name("snapkv@kvpress-knorm", budget=BUDGET, window_size=WINDOW), {"input_ids": ids}
    )
    native = _compress(model, from_name("knorm", budget=BUDGET, window_size=WINDOW), {"input_ids": ids})
    for a, b in zip(ours.layers, native.layers, strict=True):
        assert torch.equal(a.dense()[0], b.dense()[0]) and torch.equal(a.dense()[1], b.dense()[1])


@pytest.mark.parametrize("scorer", ["knorm", "tova", "expectedattention", "keydiff", "snapkv"])
def test_the_cache_holds_only_the_budget(model, ids, scorer):
    cache = _compress(
        model, from_name(f"snapkv@kvpress-{scorer}", budget=BUDGET, window_size=WINDOW), {"input_ids": ids}
    )
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=full)
    for layer in cache.layers:
        assert bool((layer.held_counts() == BUDGET).all())
    assert kv_cache_bytes(cache) == kv_cache_bytes(full) * BUDGET // PROMPT


@pytest.mark.parametrize(
    "name",
    [
        "adakv@kvpress-knorm",
        "adakv@kvpress-tova",
        "pyramidkv@kvpress-expectedattention",
        "mixkv-snapkv@kvpress-keydiff",
        "mixkv-adakv@kvpress-expectedattention",
        "mixkv-pyramidkv@kvpress-tova",
    ],
)
def test_head_wise_and_mixkv_compositions_keep_the_budget(model, ids, name):
    press = from_name(name, budget=BUDGET, window_size=WINDOW)
    cache = _compress(model, press, {"input_ids": ids})
    held = torch.stack([layer.held_counts() for layer in cache.layers])  # (L, B, Hkv)
    assert int(held.sum()) == BUDGET * held.numel()
    assert press.last_report is not None and press.last_report.compressed_layers == [0, 1, 2]


def test_adakv_on_a_kvpress_score_shares_the_budget_unevenly(model, ids):
    cache = _compress(
        model,
        from_name("adakv@kvpress-expectedattention", budget=BUDGET, window_size=WINDOW),
        {"input_ids": ids},
    )
    held = torch.stack([layer.held_counts() for layer in cache.layers])
    assert bool((held.sum(-1) == BUDGET * held.shape[-1]).all())  # exact per layer
    assert int(held.max()) > BUDGET


def test_mixkv_on_a_kvpress_score_selects_other_entries_than_the_score_alone(model, ids):
    plain = _compress(
        model, from_name("snapkv@kvpress-tova", budget=BUDGET, window_size=WINDOW), {"input_ids": ids}
    )
    mixed = _compress(
        model, from_name("mixkv-snapkv@kvpress-tova", budget=BUDGET, window_size=WINDOW), {"input_ids": ids}
    )
    assert any(
        not torch.equal(a.dense()[0], b.dense()[0]) for a, b in zip(plain.layers, mixed.layers, strict=True)
    )


def test_mixkv_presses_lists_the_scorers_and_their_options(capsys):
    from mixkv.commands import main as cli_main

    assert cli_main(["presses"]) == 0
    out = capsys.readouterr().out
    assert "<method>@kvpress-<scorer>" in out
    assert any(
        line.split()[:2] == ["expectedattention", "n_future_positions=512,"] for line in out.splitlines()
    )


def test_scorer_options_reach_the_kvpress_press():
    press = from_name(
        "adakv@kvpress-expectedattention", budget=BUDGET, n_future_positions=64, floor_ratio=0.5
    )
    assert press._kvpress_press.n_future_positions == 64 and press._inner.floor_ratio == 0.5
    assert (
        from_name("snapkv@kvpress-snapkv", budget=BUDGET, window_size=WINDOW)._kvpress_press.window_size
        == WINDOW
    )


@pytest.mark.parametrize(
    ("scorer", "cls"),
    [
        ("think", "ThinKPress"),
        ("duoattention", "DuoAttentionPress"),
        ("kvzip", "KVzipPress"),
        ("adakv", "AdaKVPress"),
        ("pyramidkv", "PyramidKVPress"),
        ("criticalkv", "CriticalKVPress"),
    ],
)
def test_a_kvpress_press_that_is_not_a_scorer_is_refused_by_name(scorer, cls):
    with pytest.raises(ValueError, match=rf"kvpress's {cls} cannot be mixkv importance"):
        from_name(f"snapkv@kvpress-{scorer}", budget=BUDGET)


def test_kvpress_names_without_method_say_how_to_write_them():
    with pytest.raises(ValueError, match=r"'snapkv@kvpress-tova'"):
        from_name("kvpress-tova", budget=BUDGET)
    with pytest.raises(ValueError, match="cannot take a kvpress score"):
        from_name("keydiff@kvpress-tova", budget=BUDGET)


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="checks the offline refusal")
@pytest.mark.parametrize("scorer", ["qfilter", "kvzap", "expectedattentionstats"])
def test_a_scorer_calibrated_on_the_hub_is_refused_offline(model, ids, scorer):
    press = from_name(f"snapkv@kvpress-{scorer}", budget=BUDGET, window_size=WINDOW)
    with pytest.raises(ValueError, match="download their weights from the Hugging Face hub"):
        _compress(model, press, {"input_ids": ids})


def test_a_scorer_needing_attention_weights_says_to_use_eager_attention(model, ids):
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        _compress(
            model,
            from_name("snapkv@kvpress-observedattention", budget=BUDGET, window_size=WINDOW),
            {"input_ids": ids},
        )


def test_a_scorer_needing_attention_weights_runs_on_eager_attention(ids):
    eager = random_llama(128, layers=3, initializer_range=0.2, pad_token_id=0, attn_implementation="eager")
    press = from_name("adakv@kvpress-observedattention", budget=BUDGET, window_size=WINDOW)
    cache = _compress(eager, press, {"input_ids": ids})
    held = torch.stack([layer.held_counts() for layer in cache.layers])
    assert int(held.sum()) == BUDGET * held.numel()


def test_a_prompt_continuing_a_cached_prefix_is_refused(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :60], past_key_values=cache)
    press = from_name("snapkv@kvpress-tova", budget=BUDGET, window_size=WINDOW)
    with (
        pytest.raises(ValueError, match="prefilled in one forward from position 0"),
        torch.no_grad(),
        press(model),
    ):
        model(ids[:, 60:], past_key_values=cache)


def test_a_padded_batch_is_refused(model, ids):
    inputs = {"input_ids": ids.repeat(2, 1), "attention_mask": torch.ones(2, PROMPT, dtype=torch.long)}
    inputs["attention_mask"][1, :5] = 0
    with pytest.raises(ValueError, match="no padding mask"):
        _compress(model, from_name("snapkv@kvpress-knorm", budget=BUDGET, window_size=WINDOW), inputs)


def test_a_recorded_prompt_is_refused(model, ids):
    press = from_name("snapkv@kvpress-tova", budget=BUDGET, window_size=WINDOW)
    with torch.no_grad(), press(model) as session, pytest.raises(ValueError, match="recording"):  # noqa: SIM117
        with session.recording_prompt():
            pass


def test_the_model_is_left_as_it_was(ids):
    model = press_test_llama()
    names = sorted(name for name, _ in model.named_modules())
    _compress(
        model,
        from_name("snapkv@kvpress-expectedattention", budget=BUDGET, window_size=WINDOW),
        {"input_ids": ids},
    )
    assert sorted(name for name, _ in model.named_modules()) == names
    assert not any("rotary_emb" in vars(layer.self_attn) for layer in model.model.layers)


@pytest.mark.parametrize("name", ["snapkv@kvpress-expectedattention", "mixkv-adakv@kvpress-tova"])
def test_a_kvpress_scorer_compresses_a_tiny_vlm(name):
    """kvpress itself loads only causal LMs; through mixkv its scorers compress a LLaVA's cache,
    image tokens included, and the model answers from the compressed cache."""
    case = build_case("llava")
    budget = 48
    press = from_name(name, budget=budget, window_size=WINDOW)
    assert isinstance(press, KvpressScorerPress)
    with torch.no_grad(), press(case.model):
        out = case.model.generate(**case.inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == case.prompt_len + 4
    report = press.last_report
    assert report is not None and report.compressed_layers == list(range(case.num_layers))
    assert report.image_tokens_total == [case.num_image_tokens]
    assert report.image_tokens_kept is not None and 0 < report.image_tokens_kept[0] < case.num_image_tokens
    cache = _compress(case.model, press, case.inputs)
    held = torch.stack([layer.held_counts() for layer in cache.layers])
    assert int(held.sum()) == budget * held.numel()


def test_a_multimodal_rope_model_refuses_a_scorer_that_rotates_queries():
    case = build_case("qwen2_vl")
    with pytest.raises(ValueError, match="M-RoPE"):
        _compress(case.model, from_name("snapkv@kvpress-tova", budget=48, window_size=WINDOW), case.inputs)
    cache = _compress(
        case.model, from_name("snapkv@kvpress-keydiff", budget=48, window_size=WINDOW), case.inputs
    )
    assert all(bool((layer.held_counts() == 48).all()) for layer in cache.layers)


def test_a_text_grid_runs_kvpress_scorers_beside_mixkv_presses(tiny, tmp_path):
    """Cells of kvpress scorers prefill on their own: sharing a prefix and decoding in a batch with
    the other cells changes none of their answers, and their caches hold the budget."""
    methods = ["snapkv", "snapkv@kvpress-tova", "mixkv-adakv@kvpress-knorm"]
    cells = grid_run_twice(tiny, tmp_path, methods, share_prefill=False, batch_decoding=False)
    assert sorted(cell["method"] for cell, _, _ in cells) == sorted(methods)
    for cell, shared, alone in cells:
        assert [e["output"] for e in shared] == [e["output"] for e in alone]
        if "@" in cell["method"]:
            assert not any(e.get("prefill_replayed") for e in shared)
            assert all(e["shared_prefix_tokens"] == 0 for e in shared)
            assert all(abs(e["kv_fraction"] - 40 / e["context_tokens"]) < 0.02 for e in shared)


def test_a_grid_refuses_modifiers_on_a_kvpress_scorer():
    from mixkv.eval.methods import parse_method

    with pytest.raises(ValueError, match="takes no \\+chunk / \\+decode"):
        parse_method("snapkv@kvpress-tova+chunk64")
