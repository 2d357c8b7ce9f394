"""Tests of the resumable evaluation grid, on a tiny random Llama with a word-level tokenizer."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

from mixkv.commands.eval import main as cli_main
from mixkv.eval import runner
from mixkv.eval.cell_store import cell_filename
from mixkv.eval.methods import MethodVariant, check_methods, parse_method
from mixkv.eval.runner import run_eval
from mixkv.eval.stats import paired_comparison
from mixkv.eval.stats_tables import format_score
from mixkv.presses.registry import build_press, kvpress_available

GRID = {
    "methods": ["full", "snapkv", "mixkv-snapkv"],
    "budgets": [40],
    "tasks": ["niah_single_1"],
    "context_lengths": [128],
    "n": 2,
    "seed": 0,
    "max_new_tokens": 3,
}
CELLS = [
    cell_filename("full", None, "niah_single_1", 128),
    cell_filename("snapkv", 40, "niah_single_1", 128),
    cell_filename("mixkv-snapkv", 40, "niah_single_1", 128),
]


@pytest.fixture
def finished(tiny, tmp_path):
    """A grid already run once into tmp_path."""
    run_eval(tiny, out_dir=tmp_path, **GRID)
    return tmp_path


def test_run_writes_one_json_file_per_cell(finished):
    assert sorted(os.listdir(finished / "cells")) == sorted(CELLS)


def test_cell_file_records_outputs_scores_and_configuration(finished):
    data = json.loads((finished / "cells" / CELLS[1]).read_text())
    assert data["complete"] is True
    assert data["cell"] == {"method": "snapkv", "budget": 40, "task": "niah_single_1", "context_length": 128}
    assert len(data["examples"]) == 2
    example = data["examples"][0]
    assert {"output", "score", "answers", "prefill_seconds", "decode_seconds", "kept_tokens_mean"} <= set(
        example
    )
    assert example["kept_tokens_mean"] == pytest.approx(40)
    assert data["config"]["budgets"] == [40] and data["seed"] == 0
    assert {"torch", "transformers", "mixkv"} <= set(data["versions"])
    assert {"platform", "cpu_count", "torch_threads"} <= set(data["machine"])


def test_compressed_cell_keeps_less_kv_memory_than_full(finished):
    full = json.loads((finished / "cells" / CELLS[0]).read_text())
    snap = json.loads((finished / "cells" / CELLS[1]).read_text())
    assert snap["examples"][0]["kv_bytes"] < full["examples"][0]["kv_bytes"]
    assert snap["kv_fraction_mean"] < 1.0


def test_resume_skips_finished_cells(tiny, finished, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(runner, "run_example", fail)
    monkeypatch.setattr(runner, "run_examples_together", fail)
    mtimes = {c: (finished / "cells" / c).stat().st_mtime_ns for c in CELLS}
    result = run_eval(tiny, out_dir=finished, **GRID)
    assert sorted(result.reused) == sorted(CELLS) and result.computed == []
    assert mtimes == {c: (finished / "cells" / c).stat().st_mtime_ns for c in CELLS}


def test_resume_computes_only_new_cells(tiny, finished):
    grid = {**GRID, "budgets": [40, 64]}
    result = run_eval(tiny, out_dir=finished, **grid)
    assert sorted(result.computed) == sorted(
        [
            cell_filename("snapkv", 64, "niah_single_1", 128),
            cell_filename("mixkv-snapkv", 64, "niah_single_1", 128),
        ]
    )
    assert sorted(result.reused) == sorted(CELLS)


class _Interrupted(Exception):
    pass


_RUN_EXAMPLE = runner.run_example
_RUN_EXAMPLES_TOGETHER = runner.run_examples_together


def _interrupt_after(monkeypatch, calls: int) -> list[int]:
    """Make the grid fail once it would compute more than ``calls`` (cell, example) records, one
    by one or decoded together; returns the running count of computed records."""
    count = [0]

    def counted(*args, **kwargs):
        if count[0] + 1 > calls:
            raise _Interrupted
        count[0] += 1
        return _RUN_EXAMPLE(*args, **kwargs)

    def counted_together(model, tokenizer, example, presses, **kwargs):
        if count[0] + len(presses) > calls:
            raise _Interrupted
        count[0] += len(presses)
        return _RUN_EXAMPLES_TOGETHER(model, tokenizer, example, presses, **kwargs)

    monkeypatch.setattr(runner, "run_example", counted)
    monkeypatch.setattr(runner, "run_examples_together", counted_together)
    return count


def test_an_interrupted_cell_resumes_after_its_last_finished_example(tiny, tmp_path, monkeypatch):
    grid = {**GRID, "n": 3}
    _interrupt_after(monkeypatch, 2 * len(CELLS))  # two whole examples of three
    with pytest.raises(_Interrupted):
        run_eval(tiny, out_dir=tmp_path, **grid)
    count = _interrupt_after(monkeypatch, 10**6)
    resumed = run_eval(tiny, out_dir=tmp_path, **grid)
    assert count[0] == len(CELLS)  # only the third example ran again
    assert sorted(os.listdir(tmp_path / "cells")) == sorted(CELLS)  # checkpoints removed
    monkeypatch.undo()
    fresh = run_eval(tiny, out_dir=tmp_path / "fresh", **grid)
    by_name = {c["cell"]["method"]: [e["output"] for e in c["examples"]] for c in fresh.cells}
    assert {c["cell"]["method"]: [e["output"] for e in c["examples"]] for c in resumed.cells} == by_name


def test_report_only_shows_a_run_in_progress_without_computing_or_changing_files(tiny, tmp_path, monkeypatch):
    grid = {**GRID, "n": 3}
    _interrupt_after(monkeypatch, 2 * len(CELLS) + 1)  # two whole examples, and one cell of the third
    with pytest.raises(_Interrupted):
        run_eval(tiny, out_dir=tmp_path, **grid)
    before = {p.name: p.read_bytes() for p in (tmp_path / "cells").iterdir()}
    count = _interrupt_after(monkeypatch, 0)  # any computation fails
    report = run_eval(tiny, out_dir=tmp_path, report_only=True, **grid)
    assert count[0] == 0 and report.computed == []
    assert {p.name: p.read_bytes() for p in (tmp_path / "cells").iterdir()} == before
    table = (tmp_path / "results.md").read_text()
    assert "A run in progress" in table and "n = 2 per cell" in table  # cut to the examples all had
    assert sorted(c["cell"]["method"] for c in report.cells) == ["full", "mixkv-snapkv", "snapkv"]
    assert all(c["complete"] is False and len(c["examples"]) == 2 for c in report.cells)
    monkeypatch.undo()
    finished = run_eval(tiny, out_dir=tmp_path / "whole", **{**grid, "n": 2})
    scores = {c["cell"]["method"]: c["score"] for c in finished.cells}
    assert {c["cell"]["method"]: c["score"] for c in report.cells} == scores


def test_report_only_with_a_larger_n_shows_the_cells_finished_with_a_smaller_one(tiny, finished, monkeypatch):
    count = _interrupt_after(monkeypatch, 0)  # any computation fails
    report = run_eval(tiny, out_dir=finished, report_only=True, **{**GRID, "n": 5})
    assert count[0] == 0
    assert sorted(c["cell"]["method"] for c in report.cells) == ["full", "mixkv-snapkv", "snapkv"]
    assert all(c["complete"] is False and len(c["examples"]) == GRID["n"] for c in report.cells)
    assert f"n = {GRID['n']} per cell" in (finished / "results.md").read_text()


def test_a_larger_n_extends_finished_cells_with_only_the_new_examples(tiny, finished, monkeypatch):
    count = _interrupt_after(monkeypatch, 10**6)
    extended = run_eval(tiny, out_dir=finished, **{**GRID, "n": 3})
    assert count[0] == len(CELLS)  # one new example per cell
    monkeypatch.undo()
    fresh = run_eval(tiny, out_dir=finished / "fresh", **{**GRID, "n": 3})
    outputs = {c["cell"]["method"]: [e["output"] for e in c["examples"]] for c in fresh.cells}
    assert {c["cell"]["method"]: [e["output"] for e in c["examples"]] for c in extended.cells} == outputs


def test_a_checkpoint_from_another_seed_is_not_used(tiny, tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, len(CELLS))
    with pytest.raises(_Interrupted):
        run_eval(tiny, out_dir=tmp_path, **GRID)
    count = _interrupt_after(monkeypatch, 10**6)
    run_eval(tiny, out_dir=tmp_path, **{**GRID, "seed": 1})
    assert count[0] == 2 * len(CELLS)


def test_corrupt_cell_file_is_reported_kept_aside_and_recomputed(tiny, finished, caplog):
    path = finished / "cells" / CELLS[1]
    path.write_text(path.read_text()[:100])  # truncated, as after a crash
    with caplog.at_level("WARNING", logger="mixkv.eval"):
        result = run_eval(tiny, out_dir=finished, **GRID)
    assert [name for name, _ in result.recomputed] == [CELLS[1]]
    assert result.computed == [CELLS[1]]
    assert CELLS[1] in caplog.text
    assert (finished / "cells" / (CELLS[1] + ".corrupt")).exists()
    assert json.loads(path.read_text())["complete"] is True
    assert sorted(result.reused) == sorted([CELLS[0], CELLS[2]])


def test_cell_without_complete_flag_is_not_used(tiny, finished):
    path = finished / "cells" / CELLS[2]
    data = json.loads(path.read_text())
    data["complete"] = False
    path.write_text(json.dumps(data))
    result = run_eval(tiny, out_dir=finished, **GRID)
    assert result.computed == [CELLS[2]]


def test_cell_from_another_seed_is_stale_and_recomputed(tiny, finished):
    path = finished / "cells" / CELLS[0]
    data = json.loads(path.read_text())
    data["identity"]["seed"] = 99
    path.write_text(json.dumps(data))
    result = run_eval(tiny, out_dir=finished, **GRID)
    assert result.computed == [CELLS[0]]
    assert (finished / "cells" / (CELLS[0] + ".stale")).exists()


def test_no_resume_recomputes_everything(tiny, finished):
    result = run_eval(tiny, out_dir=finished, resume=False, **GRID)
    assert sorted(result.computed) == sorted(CELLS) and result.reused == []


def test_markdown_table_has_a_row_per_method_and_budget_task_columns(finished):
    table = (finished / "results.md").read_text()
    assert "| method | 40 niah_single_1 |" in table
    for method in GRID["methods"]:
        assert f"| {method} |" in table


def test_budget_not_below_context_is_skipped_and_shown_as_na(tiny, tmp_path):
    result = run_eval(tiny, out_dir=tmp_path, **{**GRID, "budgets": [40, 200]})
    skipped = [name for name, _ in result.skipped]
    assert cell_filename("snapkv", 200, "niah_single_1", 128) in skipped
    assert not (tmp_path / "cells" / cell_filename("snapkv", 200, "niah_single_1", 128)).exists()
    assert "n/a" in (tmp_path / "results.md").read_text()


def test_every_budget_above_every_context_raises(tiny, tmp_path):
    with pytest.raises(ValueError, match="nothing would be compressed"):
        run_eval(tiny, out_dir=tmp_path, **{**GRID, "budgets": [512]})


def test_unknown_method_raises_listing_methods(tiny, tmp_path):
    with pytest.raises(ValueError, match="mixkv-adakv"):
        run_eval(tiny, out_dir=tmp_path, **{**GRID, "methods": ["h2o"]})


def test_kvpress_methods_without_kvpress_raise(tiny, tmp_path):
    if kvpress_available():
        pytest.skip("kvpress is installed")
    with pytest.raises(ValueError, match="kvpress"):
        run_eval(tiny, out_dir=tmp_path, **{**GRID, "methods": ["kvpress-snapkv"]})


def test_query_aware_protocol_runs(tiny, tmp_path):
    result = run_eval(tiny, out_dir=tmp_path, protocol="query_aware", **{**GRID, "methods": ["snapkv"]})
    data = result.cells[0]
    assert data["identity"]["protocol"] == "query_aware"
    assert data["examples"][0]["prefill_tokens"] == data["examples"][0]["prompt_tokens"] - 1


def test_plot_is_written_when_matplotlib_is_installed(finished):
    pytest.importorskip("matplotlib")
    assert (finished / "score_vs_budget_L128.png").stat().st_size > 0


def test_cli_runs_a_grid_from_a_model_directory(tiny, tmp_path, capsys):
    model, tok = tiny
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--methods", "full,snapkv", "--budgets", "40"]
    argv += [
        "--tasks",
        "niah_single_1",
        "--context-lengths",
        "128",
        "--n",
        "1",
        "--out",
        str(tmp_path / "out"),
    ]
    argv += ["--max-new-tokens", "2"]
    assert cli_main(argv) == 0
    assert "2 cell(s) computed" in capsys.readouterr().out
    assert (tmp_path / "out" / "results.md").exists()


def test_cli_device_places_the_model_and_is_recorded_in_the_run_configuration(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--methods", "full", "--tasks", "niah_single_1"]
    argv += ["--context-lengths", "128", "--n", "1", "--max-new-tokens", "1", "--device", "cpu"]
    assert cli_main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["config"]["device"] == "cpu"


@pytest.mark.parametrize(
    "device,message",
    [
        ("gpu0", "'gpu0' is not a torch device"),
        pytest.param(
            "cuda",
            "torch sees no CUDA GPU here; use --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_cli_refuses_a_device_torch_cannot_run_on(device, message, capsys):
    assert cli_main(["--device", device, "--methods", "full", "--n", "1"]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_budget_returns_2(capsys):
    assert cli_main(["--budgets", "sixty"]) == 2
    assert "--budgets" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["query_agnostic", "query_aware"])
def test_shared_prefill_answers_and_keeps_exactly_what_separate_prefills_do(tiny, tmp_path, protocol):
    grid = {**GRID, "methods": ["full", "snapkv", "mixkv-adakv"], "protocol": protocol}
    shared = run_eval(tiny, out_dir=tmp_path / "shared", **grid)
    separate = run_eval(tiny, out_dir=tmp_path / "separate", share_prefill=False, **grid)
    assert len(shared.cells) == len(separate.cells) == 3
    for a, b in zip(shared.cells, separate.cells, strict=True):
        assert a["cell"] == b["cell"]
        for x, y in zip(a["examples"], b["examples"], strict=True):
            assert x["shared_prefix_tokens"] == x["prefill_tokens"] - 32
            assert y["shared_prefix_tokens"] == 0
            assert (x["output"], x["kv_bytes"], x["kept_tokens_mean"]) == (
                y["output"],
                y["kv_bytes"],
                y["kept_tokens_mean"],
            )


def test_a_press_that_cannot_continue_from_a_shared_prefix_is_refused(tiny):
    from mixkv.eval.tasks import make_examples

    model, tokenizer = tiny
    example = make_examples("niah_single_1", tokenizer, 128, 1)[0]
    prefix = runner.prefill_shared_prefix(
        model, tokenizer, example, protocol="query_agnostic", tail_tokens=32
    )

    class ForeignPress:
        def __call__(self, model):
            raise AssertionError("must be refused before use")

    with pytest.raises(ValueError, match="shared prefix"):
        runner.run_example(model, tokenizer, example, ForeignPress(), prefix=prefix)


def _cell_file(directory, method, budget):
    return json.loads((directory / "cells" / cell_filename(method, budget, "niah_single_1", 128)).read_text())


def test_summary_shows_every_score_with_its_interval_and_n(finished):
    table = (finished / "results.md").read_text()
    assert f"score (%) [95% CI], n = {GRID['n']} per cell" in table
    for method, budget in (("full", None), ("snapkv", 40), ("mixkv-snapkv", 40)):
        assert f"| {method} | {format_score(_cell_file(finished, method, budget))} |" in table


def test_summary_compares_mixkv_with_its_base_on_the_same_examples(finished):
    base, mix = (
        [e["score"] for e in _cell_file(finished, m, 40)["examples"]] for m in ("snapkv", "mixkv-snapkv")
    )
    c = paired_comparison(base, mix)
    diff = f"{100 * c.difference:+.1f} [{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}]"
    row = (
        f"| snapkv | mixkv-snapkv | 40 | 1 | {GRID['n']} | {100 * c.mean_a:.1f} | {100 * c.mean_b:.1f} | "
        f"{f'**{diff}**' if c.significant else diff} | {c.wins} / {c.ties} / {c.losses} | {c.p_value:.3f} |"
    )
    assert row in (finished / "results.md").read_text()


def test_compare_adds_the_named_pairs_to_the_summary(tiny, finished):
    run_eval(tiny, out_dir=finished, compare=[("full", "snapkv")], **GRID)
    assert "| full | snapkv | 40 | 1 | 2 |" in (finished / "results.md").read_text()


def test_compare_with_a_method_that_is_not_run_raises(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"\['keydiff'\], not among the methods run"):
        run_eval(tiny, out_dir=tmp_path, compare=[("snapkv", "keydiff")], **GRID)


def test_cli_compare_needs_method_pairs(capsys):
    assert cli_main(["--compare", "snapkv"]) == 2
    assert "--compare takes METHOD:METHOD pairs" in capsys.readouterr().err


class _ForeignPress:
    """A press that is not a mixkv press (like kvpress's): after the prefill forward it keeps only
    the last ``keep`` entries of every layer, and the cache then reports ``keep`` as its length."""

    def __init__(self, keep=None):
        self.keep = keep

    @contextlib.contextmanager
    def __call__(self, model):
        def truncate(module, args, kwargs, output):
            cache = output.get("cache", output.get("past_key_values"))
            if self.keep is not None and kwargs["input_ids"].shape[1] > 1:
                for layer in cache.layers:
                    layer.keys = layer.keys[:, :, -self.keep :].clone()  # a copy, as kvpress makes
                    layer.values = layer.values[:, :, -self.keep :].clone()

        handle = model.register_forward_hook(truncate, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def _example(tokenizer):
    from mixkv.eval.tasks import make_examples

    return make_examples("niah_single_1", tokenizer, 128, 1)[0]


def test_a_foreign_press_that_keeps_everything_answers_like_the_full_cache(tiny):
    model, tokenizer = tiny
    example = _example(tokenizer)
    full = runner.run_example(model, tokenizer, example, None, max_new_tokens=6)
    foreign = runner.run_example(model, tokenizer, example, _ForeignPress(), max_new_tokens=6)
    assert foreign["output"] == full["output"] and foreign["new_tokens"] == full["new_tokens"]


def test_a_foreign_press_is_charged_for_what_its_cache_holds(tiny):
    model, tokenizer = tiny
    example = _example(tokenizer)
    full = runner.run_example(model, tokenizer, example, None, max_new_tokens=3)
    record = runner.run_example(model, tokenizer, example, _ForeignPress(keep=40), max_new_tokens=3)
    assert record["kept_tokens_mean"] == 40
    assert record["kv_bytes_full"] == full["kv_bytes"]
    assert record["kv_fraction"] == pytest.approx(40 / full["prefill_tokens"])


# -- closed-book: the question without its context ---------------------------------------------


@pytest.mark.parametrize("protocol", ["query_agnostic", "query_aware"])
def test_closed_book_answers_the_question_alone_and_keeps_the_examples_identity(tiny, protocol):
    import dataclasses

    model, tokenizer = tiny
    example = _example(tokenizer)
    closed = runner.run_closed_book(model, tokenizer, example, protocol=protocol, max_new_tokens=4)
    question = dataclasses.replace(example, context="")  # no context: nothing to prefill before the question
    alone = runner.run_example(model, tokenizer, question, None, protocol="query_aware", max_new_tokens=4)
    full = runner.run_example(model, tokenizer, example, None, protocol=protocol, max_new_tokens=4)
    assert (closed["output"], closed["kv_bytes"]) == (alone["output"], alone["kv_bytes"])
    assert closed["prefill_tokens"] < full["prefill_tokens"]
    assert closed["example_sha1"] == full["example_sha1"] and closed["context_sha1"] == full["context_sha1"]
    assert closed["closed_book"] is True
    assert closed["kv_bytes_full"] == full["kv_bytes"]
    assert closed["kv_fraction"] == pytest.approx(closed["prefill_tokens"] / full["prefill_tokens"])


def test_a_closed_book_cell_runs_once_per_task_and_pairs_with_every_budget(tiny, tmp_path):
    grid = {**GRID, "methods": ["full", "closed-book", "snapkv"], "budgets": [40, 64]}
    result = run_eval(tiny, out_dir=tmp_path, compare=[("closed-book", "snapkv")], **grid)
    assert sorted(c["cell"]["method"] for c in result.cells if c["cell"]["budget"] is None) == [
        "closed-book",
        "full",
    ]
    table = (tmp_path / "results.md").read_text()
    score = format_score(_cell_file(tmp_path, "closed-book", None))
    assert f"| closed-book | {score} | {score} |" in table
    assert "| closed-book | snapkv | 40 |" in table and "| closed-book | snapkv | 64 |" in table
    again = run_eval(tiny, out_dir=tmp_path, **grid)
    assert cell_filename("closed-book", None, "niah_single_1", 128) in again.reused


def test_closed_book_alone_prefills_no_shared_prefix(tiny, tmp_path, monkeypatch):
    def no_prefix(*args, **kwargs):
        raise AssertionError("closed-book needs no prefix of the context")

    monkeypatch.setattr(runner, "prefill_shared_prefix", no_prefix)
    result = run_eval(tiny, out_dir=tmp_path, **{**GRID, "methods": ["closed-book"]})
    assert [c["cell"]["method"] for c in result.cells] == ["closed-book"]


def test_closed_book_is_refused_outside_the_text_grid():
    with pytest.raises(ValueError, match="text task grid"):
        check_methods(["full", "closed-book"])


# -- method variants: chunked prefill (+chunkN) and bounded decoding (+decodeN) ----------------


def test_a_method_variant_names_its_press_and_how_it_runs():
    assert parse_method("MixKV-AdaKV+chunk512+decode16") == MethodVariant("mixkv-adakv", 512, 16)
    assert parse_method("snapkv") == MethodVariant("snapkv")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("snapkv+chunk", "modifiers are"),
        ("snapkv+chunk0", "modifiers are"),
        ("snapkv+tile8", "modifiers are"),
        ("snapkv+chunk8+chunk16", "modifiers are"),
        ("full+chunk8", "apply to mixkv presses"),
        ("closed-book+decode8", "apply to mixkv presses"),
        ("kvpress-snapkv+decode8", "apply to mixkv presses"),
        ("nope+chunk8", "Unknown method"),
    ],
)
def test_a_bad_method_variant_is_refused_saying_what_to_write(name, message):
    with pytest.raises(ValueError, match=message):
        check_methods([name], variants=True, closed_book=True)


def test_method_variants_are_refused_outside_the_text_grid():
    with pytest.raises(ValueError, match="text grid only"):
        check_methods(["snapkv+chunk64"])


@pytest.mark.parametrize("method", ["mixkv-snapkv", "mixkv-adakv"])
def test_a_chunk_as_long_as_the_prompt_gives_the_one_go_record(tiny, method):
    model, tokenizer = tiny
    example = _example(tokenizer)
    records = [
        runner.run_example(
            model,
            tokenizer,
            example,
            build_press(method, 40, context_tokens=128),
            max_new_tokens=4,
            prefill_chunk_size=chunk,
        )
        for chunk in (None, 10_000)
    ]
    one_go, chunked = records
    for key in ("output", "kv_bytes", "kv_bytes_full", "kv_bytes_after_decoding"):
        assert chunked[key] == one_go[key]
    assert chunked["report"]["kept_tokens"] == one_go["report"]["kept_tokens"]


def test_a_chunked_variant_runs_from_position_0_holds_the_one_go_bytes_and_is_compared_paired(tiny, tmp_path):
    pair = ("mixkv-snapkv", "mixkv-snapkv+chunk48")
    grid = {**GRID, "methods": list(pair)}
    run_eval(tiny, out_dir=tmp_path, compare=[pair], **grid)
    one_go, chunked = (_cell_file(tmp_path, m, 40)["examples"] for m in pair)
    for a, b in zip(one_go, chunked, strict=True):
        assert a["shared_prefix_tokens"] > 0 and b["shared_prefix_tokens"] == 0
        assert b["kv_bytes"] == a["kv_bytes"] < b["kv_bytes_full"]
    assert "| mixkv-snapkv | mixkv-snapkv+chunk48 | 40 |" in (tmp_path / "results.md").read_text()


def test_a_decode_variant_is_the_plain_press_until_its_interval_then_stays_bounded(tiny):
    from mixkv import DecodingPress

    model, tokenizer = tiny
    example = _example(tokenizer)

    def run(decoding_interval, new_tokens):
        press = build_press("snapkv", 40, context_tokens=128)
        if decoding_interval is not None:
            press = DecodingPress(press, interval=decoding_interval)
        return runner.run_example(
            model, tokenizer, example, press, protocol="query_aware", max_new_tokens=new_tokens
        )

    # query-aware: every forward after the prompt adds one entry per KV head (the prompt's last
    # token, then the generated ones); a bound of 40 + 4 is first reached on the 4th.
    assert run(4, 3)["output"] == run(None, 3)["output"]
    assert run(4, 3)["decoding_compressions"] == 0
    plain, bounded = run(None, 12), run(4, 12)
    assert bounded["decoding_compressions"] > 0
    assert bounded["kv_bytes"] == plain["kv_bytes"]
    assert bounded["kv_bytes_after_decoding"] <= bounded["kv_bytes"] * (40 + 4) / 40
    assert plain["kv_bytes_after_decoding"] == plain["kv_bytes"] * (40 + plain["new_tokens"]) / 40


def test_decode_variants_need_budgets_above_the_observation_window(tiny, tmp_path):
    with pytest.raises(ValueError, match="must exceed the observation window"):
        run_eval(tiny, out_dir=tmp_path, **{**GRID, "methods": ["snapkv+decode8"]}, window_size=40)


def test_examples_csv_holds_every_example_score_of_every_cell(finished):
    import csv

    with (finished / "examples.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(CELLS) * GRID["n"]
    for name in CELLS:
        data = json.loads((finished / "cells" / name).read_text())
        method, budget = data["cell"]["method"], data["cell"]["budget"]
        mine = [
            r
            for r in rows
            if r["method"] == method and r["budget"] == ("" if budget is None else str(budget))
        ]
        assert [float(r["score"]) for r in mine] == [e["score"] for e in data["examples"]]
        assert [r["example_sha1"] for r in mine] == [e["example_sha1"] for e in data["examples"]]


BOTH = ["query_aware", "query_agnostic"]


def _outputs(cells):
    return {
        (c["cell"]["method"], c["cell"]["budget"]): [
            (e["output"], e["kv_bytes"], e["kept_tokens_mean"]) for e in c["examples"]
        ]
        for c in cells
    }


def test_both_protocols_in_one_run_answer_as_two_runs_of_one_protocol_each(tiny, tmp_path):
    grid = {**GRID, "methods": ["full", "snapkv", "mixkv-snapkv", "mixkv-adakv"]}
    both = run_eval(tiny, out_dir=tmp_path / "both", protocol=BOTH, **grid)
    for protocol in BOTH:
        alone = run_eval(tiny, out_dir=tmp_path / protocol, protocol=protocol, **grid)
        mine = [c for c in both.cells if c["identity"]["protocol"] == protocol]
        assert len(mine) == 4 and _outputs(mine) == _outputs(alone.cells)


def test_both_protocols_share_one_prefix_forward_per_example(tiny, tmp_path, monkeypatch):
    calls = []
    original = runner.prefill_shared_prefix

    def counted(*args, **kwargs):
        calls.append(kwargs["protocol"])
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "prefill_shared_prefix", counted)
    run_eval(tiny, out_dir=tmp_path, protocol=BOTH, **GRID)
    # the context but its last window: the shorter prefill of the two, that of query_agnostic
    assert calls == ["query_agnostic"] * GRID["n"]


def test_a_run_of_both_protocols_writes_what_a_run_of_each_resumes(tiny, tmp_path):
    both = run_eval(tiny, out_dir=tmp_path, protocol=BOTH, **GRID)
    assert sorted(both.computed) == sorted(f"{p}/{name}" for p in BOTH for name in CELLS)
    for protocol in BOTH:
        assert sorted(os.listdir(tmp_path / protocol / "cells")) == sorted(CELLS)
        again = run_eval(tiny, out_dir=tmp_path / protocol, protocol=protocol, **GRID)
        assert again.computed == [] and sorted(again.reused) == sorted(CELLS)


def test_a_run_of_both_protocols_compares_them_in_protocols_md(tiny, tmp_path):
    both = run_eval(tiny, out_dir=tmp_path, protocol=BOTH, **GRID)
    assert both.table_path == tmp_path / "protocols.md"
    text = both.table_path.read_text()
    assert "- What differs: protocol query_aware (A) vs query_agnostic (B)" in text
    assert "- A: `query_aware`" in text and "- B: `query_agnostic`" in text  # not machine paths
    assert "[query_aware](query_aware/results.md)" in text and "| snapkv | 40 | 1 |" in text


@pytest.mark.parametrize("protocol", [[], ["query_aware", "question_first"], "both"])
def test_an_unknown_or_empty_protocol_is_refused(tiny, tmp_path, protocol):
    with pytest.raises(ValueError, match="protocol must be one or more of"):
        run_eval(tiny, out_dir=tmp_path, protocol=protocol, **GRID)


def cli_run_eval_arguments(monkeypatch, argv):
    """The keyword arguments ``mixkv eval ARGV`` passes to ``run_eval`` (which is not run)."""
    seen = {}

    def fake_run_eval(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(runner, "run_eval", fake_run_eval)
    with pytest.raises(SystemExit):
        cli_main(argv)
    return seen


def test_cli_takes_several_protocols(monkeypatch):
    assert (
        cli_run_eval_arguments(monkeypatch, ["--protocol", "query_aware,query_agnostic"])["protocol"] == BOTH
    )
