"""Tests of the full-vs-compressed fidelity measurements on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from mixkv import DecodingPress, MixKVPress, SnapKVPress
from mixkv.eval.text_fidelity import measure_fidelity, measure_fidelity_ids
from mixkv.integration import describe_decoder


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n,), generator=g)


def test_budget_at_least_context_gives_full_agreement_and_zero_kl(tiny):
    model, tok = tiny
    ctx, cont = _ids(100, len(tok)), _ids(16, len(tok), seed=1)
    report = measure_fidelity_ids(model, ctx, cont, SnapKVPress(budget=128))
    assert report.top1_agreement == 1.0
    assert report.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert max(report.layer_relative_error) < 1e-5


def test_no_press_compares_the_full_cache_with_itself(tiny):
    model, tok = tiny
    report = measure_fidelity_ids(model, _ids(60, len(tok)), _ids(8, len(tok), 1), None)
    assert report.top1_agreement == 1.0 and report.mean_kl == 0.0
    assert report.compressed_kv_bytes == report.full_kv_bytes


def test_compressing_press_changes_the_predictions(tiny):
    model, tok = tiny
    report = measure_fidelity_ids(model, _ids(200, len(tok)), _ids(16, len(tok), 1), MixKVPress(budget=40))
    assert report.mean_kl > 0.0
    assert all(err > 0 for err in report.layer_relative_error)
    assert report.compressed_kv_bytes < report.full_kv_bytes


def test_report_has_one_error_per_layer_and_one_kl_per_position(tiny):
    model, tok = tiny
    report = measure_fidelity_ids(model, _ids(120, len(tok)), _ids(10, len(tok), 1), SnapKVPress(budget=48))
    assert len(report.layer_relative_error) == len(describe_decoder(model).attention_modules) == 2
    assert len(report.kl_per_position) == 10
    assert not any(math.isnan(e) for e in report.layer_relative_error)


def test_text_api_splits_the_last_tokens_as_continuation(tiny):
    model, tok = tiny
    text = " ".join(["The grass is green. The sky is blue."] * 20)
    report = measure_fidelity(model, tok, text, SnapKVPress(budget=48), continuation_tokens=12)
    assert report.continuation_tokens == 12
    assert report.context_tokens == len(tok(text)["input_ids"]) - 12


def test_text_shorter_than_the_continuation_raises(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="longer text"):
        measure_fidelity(model, tok, "The sky is blue.", None, continuation_tokens=64)


def test_a_prefill_chunk_at_least_the_context_measures_the_one_go_prefill(tiny):
    model, tok = tiny
    ctx, cont = _ids(200, len(tok)), _ids(16, len(tok), seed=1)
    one_go = measure_fidelity_ids(model, ctx, cont, SnapKVPress(budget=40))
    chunked = measure_fidelity_ids(model, ctx, cont, SnapKVPress(budget=40), prefill_chunk=200)
    assert chunked.kl_per_position == one_go.kl_per_position


def test_decoding_press_is_measured_token_by_token_with_the_same_layer_outputs_shape(tiny):
    model, tok = tiny
    ctx, cont = _ids(100, len(tok)), _ids(40, len(tok), seed=1)
    bounded = measure_fidelity_ids(model, ctx, cont, DecodingPress(SnapKVPress(budget=128), interval=8))
    assert len(bounded.kl_per_position) == 40
    assert bounded.compressed_kv_bytes == bounded.full_kv_bytes  # the prompt fits its budget
    assert bounded.mean_kl > 0.0  # the continuation went over budget + interval and was compressed


def _command(tiny, tmp_path, methods: str, *extra: str) -> dict:
    import json

    from mixkv.commands.fidelity import main

    model, tok = tiny
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "fidelity.json"
    argv = ["--model", str(tmp_path / "model"), "--methods", methods, "--budgets", "40"]
    argv += [
        "--context-length",
        "120",
        "--continuation-tokens",
        "12",
        "--texts",
        "3",
        "--out",
        str(out),
        *extra,
    ]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_presses_sharing_one_prefill_measure_what_their_own_prefills_measure(tiny):
    from mixkv.eval.text_fidelity import _run, _runs_sharing_one_prefill

    model, _ = tiny
    ctx, cont = _ids(120, model.config.vocab_size)[None], _ids(16, model.config.vocab_size, seed=1)[None]
    presses = [SnapKVPress(budget=40), MixKVPress(budget=48, base="adakv"), SnapKVPress(budget=80)]
    full, runs = _runs_sharing_one_prefill(model, ctx, cont, presses)
    for shared, alone in zip(
        [full, *runs], [_run(model, ctx, cont, p) for p in [None, *presses]], strict=True
    ):
        assert torch.equal(shared[0], alone[0])  # logits
        assert all(torch.equal(a, b) for a, b in zip(shared[1], alone[1], strict=True))  # layer outputs
        assert shared[2] == alone[2]  # bytes


def test_the_command_gives_every_figure_with_its_interval_over_the_texts(tiny, tmp_path):
    from mixkv.eval.stats import bootstrap_ci

    result = _command(tiny, tmp_path, "snapkv,mixkv-snapkv")
    for row in result["rows"]:
        assert row["texts"] == len(row["reports"]) == 3
        kl = [r["mean_kl"] for r in row["reports"]]
        assert [row["mean_kl"], *row["mean_kl_ci"]] == pytest.approx(list(bootstrap_ci(kl)))


def test_the_command_compares_variants_and_mixkv_with_their_plain_method_on_the_same_texts(tiny, tmp_path):
    result = _command(tiny, tmp_path, "snapkv,mixkv-snapkv,snapkv+chunk40,snapkv+decode4")
    pairs = {(c["a"], c["b"], c["metric"]) for c in result["comparisons"]}
    for a, b in [("snapkv", "mixkv-snapkv"), ("snapkv", "snapkv+chunk40"), ("snapkv", "snapkv+decode4")]:
        assert {(a, b, "top1_agreement"), (a, b, "mean_kl")} <= pairs
    rows = {row["method"]: row for row in result["rows"]}
    chunked = next(
        c for c in result["comparisons"] if c["b"] == "snapkv+chunk40" and c["metric"] == "mean_kl"
    )
    assert chunked["difference"] == pytest.approx(
        rows["snapkv+chunk40"]["mean_kl"] - rows["snapkv"]["mean_kl"]
    )
    assert chunked["n"] == 3


def test_the_command_measures_on_standard_library_source_code(tiny, tmp_path):
    docs = _command(tiny, tmp_path, "snapkv")
    source = _command(tiny, tmp_path, "snapkv", "--corpus", "source")
    assert source["config"]["corpus"] == "source" and len(source["rows"][0]["reports"]) == 3
    assert source["rows"][0]["reports"] != docs["rows"][0]["reports"]  # other texts


def test_the_command_refuses_an_unknown_variant(tiny, tmp_path, capsys):
    from mixkv.commands.fidelity import main

    with pytest.raises(SystemExit):
        main(["--methods", "snapkv+tile4"])
    assert "modifiers are +chunkN" in capsys.readouterr().err
