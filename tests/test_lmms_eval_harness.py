"""lmms-eval model type `mixkv` on a local image task (YAML, utils.py, JSON lines and PNGs written
here) and a tiny random LLaVA saved to disk: nothing is downloaded."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lmms_eval")

from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

from mixkv.commands import main as cli_main
from mixkv.harnesses.lmms_eval_model import MixKVLMMs
from tests.families import build_case, draw_image, vlm_processor
from tests.harness_launch import launch_two_processes

WINDOW = 8
BUDGET = 24  # prompts hold 64 image tokens and ~10 text tokens
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}w70 {% endif %}"
)
TASK = """task: mixkv_tiny_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava")
    processor = vlm_processor("llava")
    processor.chat_template = CHAT_TEMPLATE
    build_case("llava").model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def write_task(path, documents):
    """The local image task ``mixkv_tiny_vqa`` with ``documents`` pages, written into ``path``."""
    docs = []
    for i in range(documents):
        draw_image(i, 150, 120).save(path / f"page{i}.png")
        docs.append(
            {"image": str(path / f"page{i}.png"), "question": "w80 w81 w82 w83 w84 w85", "answer": "w90"}
        )
    (path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (path / "vqa.yaml").write_text(TASK.format(data=path / "docs.jsonl"))
    (path / "utils.py").write_text(UTILS)
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("lmms-tasks"), 2)


def evaluate(model_dir, task_dir, model="mixkv", gen_kwargs="", full_output=False, **press):
    extra = "".join(f",{k}={v}" for k, v in press.items())
    out = simple_evaluate(
        model=model,
        model_args=f"pretrained={model_dir},device_map=cpu,attn_implementation=sdpa{extra}",
        tasks=["mixkv_tiny_vqa"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=1,
        device="cpu",
        log_samples=True,
        gen_kwargs=gen_kwargs,
    )
    answers = [s["resps"] for s in out["samples"]["mixkv_tiny_vqa"]]
    return (answers, out) if full_output else answers


def generate_on(model_dir, task_dir, prompt_of):
    """`transformers`' greedy answers (4 tokens) to each document's prompt ``prompt_of(processor, doc)``."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    expected = []
    for doc in map(json.loads, (task_dir / "docs.jsonl").read_text().splitlines()):
        image = Image.open(doc["image"]).convert("RGB")
        inputs = processor(text=[prompt_of(processor, doc)], images=[image], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        expected.append(
            [[processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]]
        )
    return expected


def user_turn(doc):
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}


def test_press_full_answers_like_transformers_generate(model_dir, task_dir):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    expected = []
    for doc in map(json.loads, (task_dir / "docs.jsonl").read_text().splitlines()):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[Image.open(doc["image"]).convert("RGB")], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        expected.append(
            [[processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]]
        )
    assert evaluate(model_dir, task_dir, press="full", dtype="bfloat16") == expected


def test_default_dtype_is_float32_on_the_cpu_and_the_device_fits_the_machine(model_dir, task_dir):
    def prompt(processor, doc):
        return processor.apply_chat_template([user_turn(doc)], add_generation_prompt=True, tokenize=False)

    assert evaluate(model_dir, task_dir, press="full") == generate_on(model_dir, task_dir, prompt)
    bf16 = MixKVLMMs(pretrained=str(model_dir), press="full", dtype="bfloat16", device="cpu")
    assert bf16.model.dtype == torch.bfloat16
    lm = MixKVLMMs(pretrained=str(model_dir), press="full")  # no device, no dtype
    if torch.cuda.is_available():
        assert lm.model.device.type == "cuda" and lm.model.dtype == torch.bfloat16
    else:
        assert lm.model.device.type == "cpu" and lm.model.dtype == torch.float32


def test_budget_above_the_prompt_equals_the_full_cache(model_dir, task_dir):
    kept = evaluate(model_dir, task_dir, press="mixkv-adakv", budget=512, window_size=WINDOW)
    assert kept == evaluate(model_dir, task_dir, press="full")


def test_generation_runs_compressed_on_image_tokens(model_dir, task_dir):
    lm = MixKVLMMs(
        pretrained=str(model_dir),
        device="cpu",
        device_map="cpu",
        press="mixkv-snapkv",
        budget=BUDGET,
        window_size=WINDOW,
    )
    out = simple_evaluate(
        model=lm,
        tasks=["mixkv_tiny_vqa"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=1,
    )
    assert len(out["samples"]["mixkv_tiny_vqa"]) == 2
    report = lm.press.last_report
    assert report.compressed_layers and report.kept_tokens.float().mean() == BUDGET
    assert report.image_tokens_total == [64] and report.image_tokens_kept[0] < 64


def test_unknown_model_arguments_are_refused_by_name_with_the_valid_ones(model_dir):
    with pytest.raises(
        ValueError, match=r"\['window'\].*snapkv's options: budget.*window -> window_size"
    ) as info:
        MixKVLMMs(pretrained=str(model_dir), device="cpu", press="snapkv", budget=BUDGET, window=8)
    assert "system_prompt" in str(info.value)
    with pytest.raises(ValueError, match="choose from: full, snapkv") as info:
        MixKVLMMs(pretrained=str(model_dir), device="cpu", press="snapkvv", budget=BUDGET)
    assert "kvpress" not in str(info.value)


@pytest.fixture(scope="module")
def string_system_model_dir(tmp_path_factory, model_dir):
    """The tiny LLaVA with a template that concatenates the system turn as a string (as Qwen's and
    the tiny VLM's do)."""
    import shutil

    from transformers import AutoProcessor

    path = tmp_path_factory.mktemp("tiny-llava-string-system")
    shutil.copytree(model_dir, path, dirs_exist_ok=True)
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.chat_template = STRING_SYSTEM_TEMPLATE
    processor.save_pretrained(path)
    return path


STRING_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ '<s> ' + m['content'] + ' ' }}{% else %}<s> "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} w70 {% endif %}"
)


def test_system_prompt_on_a_template_that_takes_string_content(string_system_model_dir, task_dir):
    def prompt(processor, doc):
        messages = [{"role": "system", "content": "w60 w61"}, user_turn(doc)]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    expected = generate_on(string_system_model_dir, task_dir, prompt)
    assert evaluate(string_system_model_dir, task_dir, press="full", system_prompt="w60 w61") == expected
    assert evaluate(string_system_model_dir, task_dir, press="full") != expected


def test_answer_prefix_is_continued_by_the_answer(model_dir, task_dir):
    def prompt(processor, doc):
        text = processor.apply_chat_template([user_turn(doc)], add_generation_prompt=True, tokenize=False)
        return text + "w91"

    expected = generate_on(model_dir, task_dir, prompt)
    assert evaluate(model_dir, task_dir, press="full", answer_prefix="w91") == expected
    assert evaluate(model_dir, task_dir, press="full", gen_kwargs="answer_prefix=w91") == expected
    assert evaluate(model_dir, task_dir, press="full") != expected


def test_generation_shows_a_progress_bar_and_records_the_compression(model_dir, task_dir, capsys):
    _, out = evaluate(
        model_dir, task_dir, full_output=True, press="mixkv-snapkv", budget=BUDGET, window_size=WINDOW
    )
    assert "mixkv responding" in capsys.readouterr().err
    throughput = out["throughput"]
    assert throughput["avg_mixkv_kept_tokens_per_kv_head"] == BUDGET
    assert throughput["avg_mixkv_compressed_prompts"] == 2 and 0 < throughput["avg_mixkv_kv_fraction"] < 1
    assert throughput["avg_mixkv_context_tokens"] > 64


def test_entry_point_registers_the_model_type_for_lmms_eval():
    code = "from lmms_eval.models import get_model; print(get_model('mixkv').__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("MixKVLMMs")


def test_mixkv_lmms_eval_command_runs_lmms_eval(model_dir, task_dir, tmp_path, capsys):
    code = cli_main(
        [
            "lmms-eval",
            "--model",
            "mixkv",
            "--model_args",
            f"pretrained={model_dir},device_map=cpu,press=snapkv,budget={BUDGET},window_size={WINDOW}",
            "--tasks",
            "mixkv_tiny_vqa",
            "--include_path",
            str(task_dir),
            "--device",
            "cpu",
            "--batch_size",
            "1",
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    assert "mixkv_tiny_vqa" in capsys.readouterr().out
    (results,) = (tmp_path / "out").rglob("*results*.json")
    assert json.loads(results.read_text())["throughput"]["avg_mixkv_kept_tokens_per_kv_head"] == BUDGET


@pytest.mark.parametrize(
    ("model_args", "tasks"),
    [("press=snapkv,budget=24,window=8", "mixkv_tiny_vqa"), ("press=full", "mixkv_no_such_task")],
    ids=["bad-model-argument", "unknown-task"],
)
def test_mixkv_lmms_eval_command_exits_non_zero_when_the_evaluation_fails(
    model_dir, task_dir, tmp_path, capsys, model_args, tasks
):
    code = cli_main(
        [
            "lmms-eval",
            "--model",
            "mixkv",
            "--model_args",
            f"pretrained={model_dir},device_map=cpu,{model_args}",
            "--tasks",
            tasks,
            "--include_path",
            str(task_dir),
            "--device",
            "cpu",
            "--batch_size",
            "1",
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    assert code == 1
    assert "the evaluation failed" in capsys.readouterr().err


def answers(samples):
    """Each document's filtered answer (a list of one in memory, the text itself in the samples file)."""
    return {s["doc_id"]: "".join(s["filtered_resps"]) for s in samples}


def test_two_processes_split_the_documents_and_merge_into_the_one_process_results(model_dir, tmp_path):
    (tmp_path / "tasks").mkdir()
    tasks = write_task(tmp_path / "tasks", 3)  # rank 0 answers 2 documents, rank 1 one and a padding copy
    press = {"press": "snapkv", "budget": BUDGET, "window_size": WINDOW}
    _, one = evaluate(model_dir, tasks, full_output=True, **press)
    command = ["lmms_eval", "--model", "mixkv", "--model_args"]
    command += [f"pretrained={model_dir},device_map=cpu,press=snapkv,budget={BUDGET},window_size={WINDOW}"]
    command += ["--tasks", "mixkv_tiny_vqa", "--include_path", str(tasks), "--device", "cpu"]
    command += ["--batch_size", "1", "--log_samples", "--output_path", str(tmp_path / "out")]
    done = launch_two_processes(command, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Error during evaluation" not in output, output[-3000:]
    assert "Running on rank 1" in output
    (results_file,) = (tmp_path / "out").rglob("*results*.json")
    two = json.loads(results_file.read_text())
    assert (
        two["results"]["mixkv_tiny_vqa"]["exact_match,none"]
        == one["results"]["mixkv_tiny_vqa"]["exact_match,none"]
    )
    (samples_file,) = (tmp_path / "out").rglob("*mixkv_tiny_vqa*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert answers(samples) == answers(one["samples"]["mixkv_tiny_vqa"])
    names = ["kept_tokens_per_kv_head", "kv_fraction", "context_tokens", "compressed_prompts"]
    merged = [two["throughput"][f"avg_mixkv_{name}"] for name in names]
    assert merged == pytest.approx([one["throughput"][f"avg_mixkv_{name}"] for name in names], rel=1e-12)
    assert two["throughput"]["avg_mixkv_compressed_prompts"] == 3  # the padding copy is not run


def test_a_multi_process_launch_that_accelerate_sees_as_one_process_is_refused(model_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(ValueError, match=r"accelerate sees a single process.*ACCELERATE_USE_CPU=true"):
        MixKVLMMs(pretrained=str(model_dir), device="cpu", press="full")
