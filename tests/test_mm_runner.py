"""End-to-end tests of the multimodal evaluation grid on tiny random Qwen2-VL and LLaVA models."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import transformers
from packaging.version import Version

from mixkv.commands.eval import main as cli_main
from mixkv.eval import mm_runner
from mixkv.eval.cell_store import cell_filename
from mixkv.eval.mm_datasets import load_docvqa
from mixkv.eval.mm_runner import run_mm_eval
from mixkv.eval.mm_tasks import load_mm_task
from mixkv.eval.synthetic_images import make_synthetic_suite
from mixkv.integration.chat_prompts import build_mm_prompt
from tests.families import build_case, draw_image, vlm_processor
from tests.helpers_tiny import tiny_model_and_tokenizer
from tests.test_resume_from_published import _publish

torch.set_num_threads(1)

#: Whether this transformers continues an M-RoPE (Qwen2-VL) prompt from a shared prefix (5.25 on).
M_ROPE_PREFIXES = Version(transformers.__version__) >= Version("5.25")

METHODS = ["full", "snapkv", "mixkv-snapkv"]
BUDGET = 24  # prompts are ~55-75 tokens (48 / 64 image tokens): really compressed with window 8
GRID = {"methods": METHODS, "budgets": [BUDGET], "window_size": 8, "max_new_tokens": 3, "seed": 0}
TASKS = ("synthetic_text_reading", "docvqa")


def _cells(task: str) -> list[str]:
    return [cell_filename("full", None, task, None)] + [
        cell_filename(m, BUDGET, task, None) for m in METHODS[1:]
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmdata")
    (root / "documents").mkdir()
    records = []
    for i in range(2):
        draw_image(100 + i, 160, 120).save(root / "documents" / f"doc{i}.png")
        records.append(
            {
                "questionId": 10 + i,
                "question": f"What is the total on page {i}?",
                "image": f"documents/doc{i}.png",
                "docId": i,
                "answers": [f"{i + 3}.50"],
            }
        )
    (root / "val_v1.0.json").write_text(json.dumps({"dataset_name": "docvqa", "data": records}))
    return root


@pytest.fixture(scope="module")
def tasks(data_dir):
    return {
        "synthetic_text_reading": make_synthetic_suite("text_reading", 2, 0, data_dir / "synthetic"),
        "docvqa": load_docvqa(data_dir / "val_v1.0.json"),
    }


@pytest.fixture(scope="module", params=["qwen2_vl", "llava"])
def vlm(request):
    return build_case(request.param).model, vlm_processor(request.param)


@pytest.fixture(scope="module")
def finished(vlm, tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("mmout")
    result = run_mm_eval(vlm, tasks, out_dir=out, **GRID)
    return out, result


def test_grid_writes_every_cell_with_image_tokens_and_less_kv(finished):
    out, result = finished
    expected = [c for t in TASKS for c in _cells(t)]
    assert sorted(result.computed) == sorted(expected)
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(expected)
    for task in TASKS:
        full = json.loads((out / "cells" / _cells(task)[0]).read_text())
        assert full["complete"] is True and full["cell"]["context_length"] is None
        assert len(full["examples"]) == 2 and set(full["scores"]) == {full["examples"][0]["metric"]}
        for name in _cells(task)[1:]:
            data = json.loads((out / "cells" / name).read_text())
            for ex in data["examples"]:
                assert ex["compressed"] is True and ex["prompt_tokens"] > BUDGET
                assert ex["report"]["image_tokens_total"][0] > 0
                assert ex["image_tokens_total"] == ex["image_tokens"] > 0
                assert ex["image_tokens_kept"] < ex["image_tokens_total"]
                assert 0 < ex["kv_bytes"] < ex["kv_bytes_full"]
                assert ex["kv_bytes_full"] == pytest.approx(full["examples"][0]["kv_bytes"], rel=0.5)
                assert ex["new_tokens"] == 3 and 0.0 <= ex["score"] <= 1.0
            assert data["kv_fraction_mean"] < 1.0
            assert data["config"]["methods"] == METHODS and data["config"]["prompt_format"] == "plain"
            assert data["seed"] == 0 and {"torch", "transformers", "mixkv"} <= set(data["versions"])
            assert {"platform", "cpu_count", "torch_threads"} <= set(data["machine"])


def test_table_and_plot(finished):
    out, _ = finished
    table = (out / "results.md").read_text()
    assert f"| method | {BUDGET} synthetic_text_reading | {BUDGET} docvqa | {BUDGET} avg |" in table
    for method in METHODS:
        assert f"| {method} |" in table
    assert "n/a" not in table
    pytest.importorskip("matplotlib")
    assert (out / "score_vs_budget.png").stat().st_size > 0


def test_table_reports_the_image_tokens_each_method_kept(finished):
    out, result = finished
    table = (out / "results.md").read_text()
    section = table.split("## image tokens kept per KV head")[1].split("##")[0]
    for method in METHODS:
        examples = [e for c in result.cells if c["cell"]["method"] == method for e in c["examples"]]
        row = next(line for line in section.splitlines() if line.startswith(f"| {method} |"))
        kept, total = (float(x) for x in re.search(r"(\d+) of (\d+)", row).groups())
        assert total == round(sum(e["image_tokens"] for e in examples) / len(examples))
        assert (kept == total) if method == "full" else (0 < kept < total)


def test_resume_skips_finished_cells(vlm, tasks, finished, monkeypatch):
    out, _ = finished

    def fail(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(mm_runner, "run_mm_example", fail)
    result = run_mm_eval(vlm, tasks, out_dir=out, **GRID)
    assert result.computed == [] and sorted(result.reused) == sorted(c for t in TASKS for c in _cells(t))


def test_an_interrupted_cell_resumes_after_its_last_finished_example(tasks, tmp_path, monkeypatch):
    model = build_case("llava").model, vlm_processor("llava")
    grid = {**GRID, "methods": ["snapkv"]}
    only = {"docvqa": tasks["docvqa"]}
    real = mm_runner.run_mm_example
    calls: list[str] = []

    def stop_after_one(model, processor, example, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(example.id)
        return real(model, processor, example, *args, **kwargs)

    monkeypatch.setattr(mm_runner, "run_mm_example", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_mm_eval(model, only, out_dir=tmp_path, **grid)
    assert not (tmp_path / "cells" / cell_filename("snapkv", BUDGET, "docvqa", None)).exists()

    def record(model, processor, example, *args, **kwargs):
        calls.append(example.id)
        return real(model, processor, example, *args, **kwargs)

    monkeypatch.setattr(mm_runner, "run_mm_example", record)
    run_mm_eval(model, only, out_dir=tmp_path, **grid)
    examples = [e.id for e in tasks["docvqa"]]
    assert calls == examples  # the second run computed only the example the first did not finish
    cell = json.loads((tmp_path / "cells" / cell_filename("snapkv", BUDGET, "docvqa", None)).read_text())
    assert [e["id"] for e in cell["examples"]] == examples
    assert not list((tmp_path / "cells").glob(".*.partial"))


def test_report_only_reports_a_run_in_progress_from_its_checkpoints(tasks, tmp_path, monkeypatch):
    model = build_case("llava").model, vlm_processor("llava")
    # Cells decoded one by one (no batch), so that the run stops between two cells' examples.
    grid = {**GRID, "methods": ["snapkv", "mixkv-snapkv"], "batch_decoding": False}
    only = {"docvqa": tasks["docvqa"]}
    real = mm_runner.run_mm_example
    calls: list[str] = []

    def stop_after_three(*args, **kwargs):
        if len(calls) == 3:  # the first example in both cells, the second in one
            raise KeyboardInterrupt
        calls.append("run")
        return real(*args, **kwargs)

    monkeypatch.setattr(mm_runner, "run_mm_example", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_mm_eval(model, only, out_dir=tmp_path, **grid)
    before = {p.name: p.read_bytes() for p in (tmp_path / "cells").iterdir()}
    report = run_mm_eval(model, only, out_dir=tmp_path, report_only=True, **grid)
    assert len(calls) == 3 and report.computed == []
    assert {p.name: p.read_bytes() for p in (tmp_path / "cells").iterdir()} == before
    assert [len(c["examples"]) for c in report.cells] == [1, 1]
    table = (tmp_path / "results.md").read_text()
    assert "A run in progress" in table and "n = 1 per cell" in table
    assert "## image tokens kept per KV head" in table


def test_changed_examples_make_cells_stale(vlm, tasks, finished):
    out, _ = finished
    fewer = {"docvqa": tasks["docvqa"][:1]}
    result = run_mm_eval(vlm, fewer, out_dir=out, **{**GRID, "methods": ["full"]})
    assert result.computed == [_cells("docvqa")[0]]
    assert [name for name, _ in result.recomputed] == [_cells("docvqa")[0]]


def test_text_only_model_is_rejected(tasks, tmp_path):
    text_model = tiny_model_and_tokenizer(seed=0)
    with pytest.raises(
        ValueError, match="is a text-only model; multimodal tasks need a vision-language model"
    ):
        run_mm_eval(text_model, tasks, out_dir=tmp_path, **GRID)
    assert cli_main(["--tasks", "synthetic_bar_chart", "--n", "1", "--out", str(tmp_path / "o")]) == 2


def test_missing_image_is_named(vlm, tasks, tmp_path):
    broken = tmp_path / "doc.png"
    shutil.copy(tasks["docvqa"][0].image_path, broken)
    examples = load_docvqa(tasks["docvqa"][0].image_path.parents[1] / "val_v1.0.json")
    examples[1].image_path = broken
    broken.unlink()
    with pytest.raises(FileNotFoundError, match=r"doc\.png"):
        run_mm_eval(vlm, {"docvqa": examples}, out_dir=tmp_path / "out", **GRID)


def test_loader_missing_image_and_unknown_task(data_dir, tmp_path, capsys):
    ann = json.loads((data_dir / "val_v1.0.json").read_text())
    ann["data"][0]["image"] = "documents/nope.png"
    (tmp_path / "val.json").write_text(json.dumps(ann))
    shutil.copytree(data_dir / "documents", tmp_path / "documents")
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        load_mm_task("docvqa", data=tmp_path / "val.json")
    with pytest.raises(ValueError, match="Unknown multimodal task 'vizwiz'"):
        load_mm_task("vizwiz")
    with pytest.raises(ValueError, match="--images textvqa=DIR"):
        load_mm_task("textvqa", data=tmp_path / "val.json")
    assert cli_main(["--model", str(tmp_path), "--tasks", "docvqa,vizwiz", "--out", str(tmp_path)]) == 2
    assert "vizwiz" in capsys.readouterr().err


def test_chat_template_prompt(tasks, tmp_path):
    processor = vlm_processor("llava")
    processor.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    prompt, how = build_mm_prompt(processor, "Read it.")
    assert how == "chat_template" and prompt == "USER: <image>Read it. ASSISTANT:"
    model = build_case("llava").model
    ex = tasks["synthetic_text_reading"][0]
    record = mm_runner.run_mm_example(model, processor, ex, None, max_new_tokens=2)
    assert record["prompt"] == "USER: <image>What is the code written in the image? ASSISTANT:"
    assert record["image_tokens"] == 64 and record["kv_fraction"] == 1.0


def test_cli_synthetic_tasks_on_a_model_directory(tmp_path, capsys):
    case = build_case("llava")
    case.model.save_pretrained(tmp_path / "model")
    vlm_processor("llava").save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--methods", "full,mixkv-snapkv", "--budgets", str(BUDGET)]
    argv += ["--tasks", "synthetic_text_reading,synthetic_gui_grounding", "--n", "1", "--seed", "3"]
    argv += ["--out", str(tmp_path / "out"), "--window-size", "8", "--max-new-tokens", "2"]
    assert cli_main(argv) == 0
    assert "4 cell(s) computed" in capsys.readouterr().out
    assert (tmp_path / "out" / "synthetic_images" / "gui_grounding" / "gui_grounding_3_00000.png").is_file()
    data = json.loads(
        (
            tmp_path
            / "out"
            / "cells"
            / cell_filename("mixkv-snapkv", BUDGET, "synthetic_gui_grounding", None)
        ).read_text()
    )
    assert data["examples"][0]["image_tokens_total"] > 0 and data["config"]["sources"]
    assert cli_main(argv) == 0
    assert "0 cell(s) computed, 4 reused" in capsys.readouterr().out


def test_cli_docvqa_with_data_file(data_dir, tmp_path, capsys):
    case = build_case("llava")
    case.model.save_pretrained(tmp_path / "model")
    vlm_processor("llava").save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--methods", "full", "--tasks", "docvqa"]
    argv += ["--data", str(data_dir / "val_v1.0.json"), "--n", "1", "--out", str(tmp_path / "out")]
    argv += ["--max-new-tokens", "2"]
    assert cli_main(argv) == 0
    assert "1 cell(s) computed" in capsys.readouterr().out
    assert (tmp_path / "out" / "cells" / cell_filename("full", None, "docvqa", None)).is_file()


def test_mixing_text_and_multimodal_tasks_is_an_error(tmp_path, capsys):
    argv = ["--model", str(tmp_path), "--tasks", "niah_single_1,synthetic_bar_chart", "--out", str(tmp_path)]
    assert cli_main(argv) == 2
    assert "cannot be mixed" in capsys.readouterr().err


def test_observation_window_is_at_most_half_the_budget():
    assert mm_runner.observation_window(32, 32) == 16
    assert mm_runner.observation_window(32, 64) == 32
    assert mm_runner.observation_window(32, 256) == 32
    assert mm_runner.observation_window(32, None) == 32


def test_sparsemm_without_head_scores_names_the_calibrate_command(vlm, tasks, tmp_path):
    grid = {**GRID, "methods": ["sparsemm"]}
    with pytest.raises(ValueError, match="mixkv calibrate"):
        run_mm_eval(vlm, {"docvqa": tasks["docvqa"]}, out_dir=tmp_path, **grid)


def test_sparsemm_cells_use_calibrated_head_scores_and_record_their_digest(tasks, tmp_path):
    from mixkv.integration.calibration import calibrate

    eager = build_case("qwen2_vl", attn_implementation="eager")
    scores = calibrate(eager.model, [eager.inputs], window_size=8).save(tmp_path / "heads.json")
    model = build_case("qwen2_vl").model, vlm_processor("qwen2_vl")
    grid = {**GRID, "methods": ["snapkv", "sparsemm", "mixkv-sparsemm"]}
    result = run_mm_eval(
        model, {"docvqa": tasks["docvqa"]}, out_dir=tmp_path / "out", head_scores=scores, **grid
    )
    for name in ("sparsemm", "mixkv-sparsemm"):
        cell = json.loads(
            (tmp_path / "out" / "cells" / cell_filename(name, BUDGET, "docvqa", None)).read_text()
        )
        assert len(cell["identity"]["head_scores_sha1"]) == 40
        assert all(r["compressed"] for r in cell["examples"])
    assert result is not None
    # the other cells do not depend on the head scores: a run without them reuses them
    snapkv = cell_filename("snapkv", BUDGET, "docvqa", None)
    assert "head_scores_sha1" not in json.loads((tmp_path / "out" / "cells" / snapkv).read_text())["identity"]
    again = run_mm_eval(
        model, {"docvqa": tasks["docvqa"]}, out_dir=tmp_path / "out", **{**grid, "methods": ["snapkv"]}
    )
    assert again.computed == [] and again.recomputed == [] and len(again.reused) == 1


def _encoded(processor, example):
    return mm_runner.encode_example(processor, example, mm_runner.example_prompt(processor, example))


def _text_after_image(model, inputs) -> int:
    ids = inputs["input_ids"][0]
    return int(ids.shape[0] - 1 - (ids == model.config.image_token_id).nonzero().max())


@pytest.mark.parametrize("method", ["full", "snapkv", "mixkv-adakv"])
@pytest.mark.parametrize("split", ["in_the_text", "in_the_image"])
def test_a_shared_image_prefix_gives_the_one_go_answer_and_counts(vlm, tasks, method, split):
    from mixkv.presses.registry import build_press

    model, processor = vlm
    for example in tasks["docvqa"]:
        inputs = _encoded(processor, example)
        tail = 8 if split == "in_the_text" else _text_after_image(model, inputs) + 4
        assert (tail <= _text_after_image(model, inputs)) == (split == "in_the_text")
        prefix = mm_runner.prefill_image_prefix(model, inputs, tail_tokens=tail)
        if split == "in_the_image" and model.config.model_type == "qwen2_vl":
            assert prefix is None  # M-RoPE positions of image tokens: never split inside the image
            continue
        if model.config.model_type == "qwen2_vl" and not M_ROPE_PREFIXES:
            assert prefix is None  # transformers 5.2 continues an M-RoPE prompt at wrong positions
            continue
        assert prefix is not None and prefix.tokens == inputs["input_ids"].shape[1] - tail
        assert (prefix.embeddings is None) == (split == "in_the_text")
        records = []
        for shared in (None, prefix):
            press = build_press(method, BUDGET, context_tokens=prefix.tokens + tail, window_size=8)
            records.append(
                mm_runner.run_mm_example(
                    model, processor, example, press, max_new_tokens=3, inputs=inputs, prefix=shared
                )
            )
        one_go, shared_run = records
        assert shared_run["shared_prefix_tokens"] == prefix.tokens and one_go["shared_prefix_tokens"] == 0
        assert shared_run["output"] == one_go["output"]
        assert shared_run["kv_bytes"] == one_go["kv_bytes"]
        assert shared_run["kv_bytes_full"] == one_go["kv_bytes_full"]
        assert shared_run["image_tokens_total"] == one_go["image_tokens_total"] > 0
        assert shared_run["image_tokens_kept"] == pytest.approx(one_go["image_tokens_kept"])
        if method != "full":
            assert shared_run["report"]["kept_tokens"] == one_go["report"]["kept_tokens"]
            assert shared_run["image_tokens_kept"] < shared_run["image_tokens_total"]


def test_no_prefix_is_shared_for_a_prompt_barely_longer_than_the_tail(vlm, tasks):
    model, processor = vlm
    inputs = _encoded(processor, tasks["docvqa"][0])
    assert mm_runner.prefill_image_prefix(model, inputs, tail_tokens=inputs["input_ids"].shape[1] - 1) is None


def test_grid_cells_share_one_prefix_per_example_unless_told_not_to(vlm, tasks, finished, tmp_path):
    out, _ = finished
    shared = json.loads((out / "cells" / cell_filename("mixkv-snapkv", BUDGET, "docvqa", None)).read_text())
    shares = vlm[0].config.model_type != "qwen2_vl" or M_ROPE_PREFIXES
    assert all(
        r["shared_prefix_tokens"] == (r["prompt_tokens"] - 8 if shares else 0) for r in shared["examples"]
    )
    assert shared["config"]["share_prefill"] is True
    grid = {**GRID, "methods": ["mixkv-snapkv"]}
    run_mm_eval(vlm, {"docvqa": tasks["docvqa"]}, out_dir=tmp_path, share_prefill=False, **grid)
    one_go = json.loads(
        (tmp_path / "cells" / cell_filename("mixkv-snapkv", BUDGET, "docvqa", None)).read_text()
    )
    assert all(r["shared_prefix_tokens"] == 0 for r in one_go["examples"])
    assert [r["output"] for r in one_go["examples"]] == [r["output"] for r in shared["examples"]]


@pytest.mark.parametrize("family", ["gemma3", "qwen2_vl"])
def test_no_prefix_is_shared_inside_the_image_where_image_tokens_are_not_plain_causal(family):
    # Gemma 3 attends bidirectionally within an image (token_type_ids), Qwen2-VL places image
    # tokens with M-RoPE: a forward split inside the image would not be the one-go computation.
    case = build_case(family)
    ids = case.inputs["input_ids"][0]
    after_image = int(ids.shape[0] - 1 - (ids == case.image_token_id).nonzero().max())
    inside = mm_runner.prefill_image_prefix(case.model, case.inputs, tail_tokens=after_image + 2)
    in_the_text = mm_runner.prefill_image_prefix(case.model, case.inputs, tail_tokens=after_image)
    assert inside is None
    if family == "qwen2_vl" and not M_ROPE_PREFIXES:
        assert in_the_text is None  # transformers 5.2 continues an M-RoPE prompt at wrong positions
    else:
        assert in_the_text is not None and in_the_text.embeddings is None


def test_a_published_multimodal_run_is_extended_elsewhere_computing_only_what_it_lacks(
    tasks, tmp_path, monkeypatch
):
    model = build_case("llava").model, vlm_processor("llava")
    only = {"docvqa": tasks["docvqa"]}
    first = run_mm_eval(model, only, out_dir=tmp_path / "first", **GRID)
    published = _publish(tmp_path / "first", tmp_path / "published")
    written = json.loads((published / "run.json").read_text())
    assert sorted(written["cell_identities"]) == sorted(_cells("docvqa"))
    # Another machine runs a grid with one method more: only its cell is computed.
    real, calls = mm_runner.run_mm_example, []

    def record(model, processor, example, *args, **kwargs):
        calls.append(example.id)
        return real(model, processor, example, *args, **kwargs)

    monkeypatch.setattr(mm_runner, "run_mm_example", record)
    grid = {**GRID, "methods": [*METHODS, "streamingllm"], "batch_decoding": False}
    extended = run_mm_eval(model, only, out_dir=tmp_path / "elsewhere", resume_from=published, **grid)
    assert calls == [e.id for e in tasks["docvqa"]]  # the streamingllm cell's examples, nothing else
    before = {c["cell"]["method"]: c for c in first.cells}
    for cell in extended.cells:
        method = cell["cell"]["method"]
        if method == "streamingllm":
            continue
        assert cell["score"] == before[method]["score"]
        assert [e["output"] for e in cell["examples"]] == [e["output"] for e in before[method]["examples"]]
        for key in ("image_tokens_total_mean", "image_tokens_kept_mean", "kv_fraction_mean"):
            assert cell[key] == pytest.approx(before[method][key])
        assert {e["resumed_from"] for e in cell["examples"]} == {str(published)}


def test_a_published_multimodal_cell_of_other_examples_is_refused_naming_the_cell(tasks, tmp_path):
    model = build_case("llava").model, vlm_processor("llava")
    grid = {**GRID, "methods": ["snapkv"]}
    run_mm_eval(model, {"docvqa": tasks["docvqa"]}, out_dir=tmp_path / "first", **grid)
    published = _publish(tmp_path / "first", tmp_path / "published")
    fewer = {"docvqa": tasks["docvqa"][:1]}
    with pytest.raises(ValueError, match=r"snapkv__b24__docvqa\.json was run with .*task_examples=2"):
        run_mm_eval(model, fewer, out_dir=tmp_path / "elsewhere", resume_from=published, **grid)
