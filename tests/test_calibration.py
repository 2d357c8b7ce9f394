"""Offline head statistics: measured values, files, shape checks, the CLI."""

import json

import pytest
import torch
from transformers import DynamicCache

import mixkv
from mixkv.calibration import calibrate, load_head_statistics, main, resolve_head_table
from mixkv.functional import head_redundancy
from tests.families import build_case
from tests.helpers_tiny import tiny_model_and_tokenizer


@pytest.fixture(scope="module")
def vlm_case():
    return build_case("qwen2_vl", attn_implementation="eager")


def test_redundancy_is_the_mean_over_prompts_of_each_heads_key_similarity(vlm_case):
    model, inputs = vlm_case.model, vlm_case.inputs
    stats = calibrate(model, [inputs, inputs], window_size=8)
    cache = DynamicCache(config=model.config)
    model(**inputs, past_key_values=cache)
    expected = torch.stack([head_redundancy(cache.layers[i].keys)[0] for i in range(vlm_case.num_layers)])
    assert stats.num_samples == 2
    assert torch.allclose(stats.redundancy, expected, atol=1e-6)


def test_visual_head_scores_are_the_window_attention_mass_on_image_tokens(vlm_case):
    model, inputs = vlm_case.model, vlm_case.inputs
    stats = calibrate(model, [inputs], window_size=8)
    attentions = model(**inputs, output_attentions=True).attentions
    is_image = inputs["input_ids"][0] == vlm_case.image_token_id
    expected = torch.stack([a[0, :, -8:, :][..., is_image].sum(-1).mean(-1) for a in attentions])
    assert stats.visual_head_scores is not None
    assert torch.allclose(stats.visual_head_scores, expected, atol=1e-6)
    assert stats.visual_head_scores.shape == (vlm_case.num_layers, 4)


def test_calibration_needs_eager_attention():
    case = build_case("llama")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        calibrate(case.model, [case.inputs])


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_statistics_files_round_trip_and_feed_the_presses(vlm_case, tmp_path, suffix):
    stats = calibrate(vlm_case.model, [vlm_case.inputs], window_size=8)
    path = stats.save(tmp_path / f"stats{suffix}")
    tables = load_head_statistics(path)
    assert torch.allclose(tables["redundancy"], stats.redundancy)
    assert torch.allclose(tables["visual_head_scores"], stats.visual_head_scores)
    sdpa_case = build_case("qwen2_vl")
    press = mixkv.MixKVPress(budget=40, window_size=8, base="sparsemm", redundancy=path, head_scores=path)
    with press(sdpa_case.model):
        sdpa_case.model.generate(**sdpa_case.inputs, max_new_tokens=2, do_sample=False)
    assert press.last_report is not None


def test_a_text_only_statistics_file_has_no_visual_table(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"redundancy": [[0.5, 0.5]], "visual_head_scores": None}))
    with pytest.raises(ValueError, match="no 'visual_head_scores' table"):
        resolve_head_table(path, "visual_head_scores")


def test_corrupt_statistics_file_is_reported(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_head_statistics(path)


def test_calibrate_command_writes_a_file_for_a_local_model(tmp_path, capsys):
    model, tokenizer = tiny_model_and_tokenizer()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "the cat sat on the mat and the dog sat on the log\nthe sky is blue and the grass is green\n"
    )
    out = tmp_path / "stats.json"
    assert main([str(model_dir), "--prompts", str(prompts), "--out", str(out), "--window-size", "4"]) == 0
    payload = json.loads(out.read_text())
    assert payload["num_samples"] == 2
    assert len(payload["redundancy"]) == model.config.num_hidden_layers
    assert payload["visual_head_scores"] is None
    assert "wrote" in capsys.readouterr().out
