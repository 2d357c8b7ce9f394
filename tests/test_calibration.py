"""Offline head statistics: measured values, files, shape checks, the CLI."""

import json

import pytest
import torch
from transformers import DynamicCache

import mixkv
from mixkv.commands.calibrate import main
from mixkv.functional import head_redundancy
from mixkv.integration.calibration import calibrate
from mixkv.presses.head_tables import HeadStatistics, load_head_statistics, resolve_head_table
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


def test_image_and_text_redundancy_are_measured_over_their_own_keys(vlm_case):
    model, inputs = vlm_case.model, vlm_case.inputs
    stats = calibrate(model, [inputs], window_size=8)
    cache = DynamicCache(config=model.config)
    model(**inputs, past_key_values=cache)
    is_image = inputs["input_ids"][0] == vlm_case.image_token_id
    image = torch.stack(
        [head_redundancy(cache.layers[i].keys[:, :, is_image])[0] for i in range(vlm_case.num_layers)]
    )
    text = torch.stack(
        [head_redundancy(cache.layers[i].keys[:, :, ~is_image])[0] for i in range(vlm_case.num_layers)]
    )
    assert stats.visual_redundancy is not None and stats.text_redundancy is not None
    assert torch.allclose(stats.visual_redundancy, image.clamp(0, 1), atol=1e-6)
    assert torch.allclose(stats.text_redundancy, text.clamp(0, 1), atol=1e-6)


def test_the_redundancy_summary_compares_visual_and_text_tokens_head_by_head():
    stats = HeadStatistics(
        "llava",
        3,
        redundancy=torch.full((2, 2), 0.5),
        visual_head_scores=None,
        visual_redundancy=torch.tensor([[0.9, 0.4], [0.8, 0.7]]),
        text_redundancy=torch.tensor([[0.5, 0.6], [0.2, 0.3]]),
    )
    assert stats.redundancy_summary() == (
        "key redundancy over visual vs text tokens, mean of 4 KV heads: 0.700 vs 0.400; "
        "visual higher in 3 of 4 heads"
    )
    assert HeadStatistics("llama", 3, torch.full((2, 2), 0.5), None).redundancy_summary() is None


def test_text_only_prompts_have_no_image_or_text_redundancy_tables():
    case = build_case("llama", attn_implementation="eager")
    stats = calibrate(case.model, [case.inputs])
    assert stats.visual_redundancy is None and stats.text_redundancy is None


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
    assert torch.allclose(tables["visual_redundancy"], stats.visual_redundancy)
    assert torch.allclose(tables["text_redundancy"], stats.text_redundancy)
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


VIDEO_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endfor %}"
)


def test_prompts_file_videos_are_frame_lists_encoded_into_video_tokens(tmp_path):
    from mixkv.integration.calibration import encode_prompt, read_prompts
    from tests.video_families import build_video_case

    case = build_video_case("qwen2_vl", attn_implementation="eager")
    for i, frame in enumerate(case.frames):
        frame.save(tmp_path / f"frame{i}.png")
    frame_names = [f"frame{i}.png" for i in range(len(case.frames))]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"text": "w70 w71 w72", "videos": [frame_names]}) + "\n")
    case.processor.chat_template = VIDEO_TEMPLATE
    (prompt,) = read_prompts(prompts_file)
    sample = encode_prompt(case.processor, prompt, tmp_path)
    expected = int((case.video_inputs["input_ids"] == case.video_token_id).sum())
    assert int((sample["input_ids"] == case.video_token_id).sum()) == expected
    stats = calibrate(case.model, [sample], window_size=4)
    assert stats.visual_head_scores is not None


def test_prompts_file_rejects_a_video_that_is_neither_a_path_nor_frames(tmp_path):
    from mixkv.integration.calibration import read_prompts

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"text": "hello", "videos": [[]]}) + "\n")
    with pytest.raises(ValueError, match="non-empty list of frame image paths"):
        read_prompts(prompts_file)


def test_videos_with_a_processor_without_video_processor_are_refused(tmp_path):
    from mixkv.integration.calibration import encode_prompt
    from tests.families import vlm_processor

    processor = vlm_processor("qwen2_vl")
    prompt = {"text": "w70", "images": [], "videos": [["frame0.png"]]}
    with pytest.raises(ValueError, match="has no video processor"):
        encode_prompt(processor, prompt, tmp_path)
