"""Video prompts on every video-capable family: counted, compressed exactly, batched with images."""

import functools

import pytest
import torch
from transformers import DynamicCache

import mixkv
from mixkv.integration.calibration import calibrate
from mixkv.presses.registry import build_press
from tests.test_press_families import BUDGET, WINDOW, check_compressed_cache
from tests.video_families import VIDEO_FAMILIES, build_video_case


@functools.cache
def cached_video_case(family, attn_implementation="sdpa"):
    return build_video_case(family, attn_implementation=attn_implementation)


def press_for(name, inputs, budget):
    return build_press(name, budget, context_tokens=int(inputs["input_ids"].shape[1]), window_size=WINDOW)


def prefill(model, inputs):
    cache = DynamicCache(config=model.config)
    model(**inputs, past_key_values=cache, use_cache=True)
    return cache


def processor_counts(case):
    """(image, video) placeholder tokens of the video prompt, as the processor marked them."""
    inputs = case.video_inputs
    if "mm_token_type_ids" in inputs:  # the processor's own modality labels: 1 image, 2 video
        types = inputs["mm_token_type_ids"][0]
        return int((types == 1).sum()), int((types == 2).sum())
    ids = inputs["input_ids"][0]
    video = int((ids == case.video_token_id).sum()) if case.video_token_id is not None else 0
    return int((ids == case.image_token_id).sum()), video


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_report_counts_the_processors_video_tokens(family):
    case = cached_video_case(family)
    image_total, video_total = processor_counts(case)
    assert image_total + video_total >= 30  # the clip really is a large part of the prompt
    press = press_for("mixkv-adakv", case.video_inputs, BUDGET)
    with press(case.model):
        prefill(case.model, case.video_inputs)
    report = press.last_report
    length = int(case.video_inputs["input_ids"].shape[1])
    assert report.image_tokens_total == [image_total]
    assert report.video_tokens_total == [video_total]
    assert report.visual_tokens_total == [image_total + video_total]
    assert report.text_tokens_total == [length - image_total - video_total]
    kept_mean = report.kept_tokens[:, report.compressed_layers].float().mean().item()
    parts = report.image_tokens_kept[0] + report.video_tokens_kept[0] + report.text_tokens_kept[0]
    assert parts == pytest.approx(kept_mean)
    assert 0 < report.visual_tokens_kept[0] <= image_total + video_total
    kind = "video" if video_total else "image"
    assert f"{kind} tokens kept" in report.summary()


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_prompt_at_budget_of_its_length_generates_bit_identically(family):
    case = cached_video_case(family)
    inputs = case.video_inputs
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    reference = case.model.generate(**inputs, **kwargs)
    press = press_for("mixkv-adakv", inputs, int(inputs["input_ids"].shape[1]))
    with press(case.model):
        out = case.model.generate(**inputs, **kwargs)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, reference.scores, strict=True))
    report = press.last_report
    assert report.compressed_layers == []
    assert report.video_tokens_kept == [float(t) for t in report.video_tokens_total]


@pytest.mark.parametrize("press_name", ["snapkv", "mixkv-adakv"])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_compressed_video_cache_attends_like_the_masked_full_cache(family, press_name):
    case = cached_video_case(family)
    press = press_for(press_name, case.video_inputs, BUDGET)
    layout = mixkv.integration.describe_decoder(case.model)
    full = prefill(case.model, case.video_inputs)
    with press(case.model):
        check_compressed_cache(layout, press, full, prefill(case.model, case.video_inputs))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_padded_batch_of_a_video_and_an_image_prompt_generates_like_each_alone(family):
    case = cached_video_case(family)
    batch = case.padded_batch()
    press = press_for("mixkv-adakv", batch, BUDGET)
    with press(case.model):
        batched = case.model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        report = press.last_report
        alone = []
        for row in (case.video_inputs, case.image_inputs):
            alone.append(case.model.generate(**row, max_new_tokens=3, do_sample=False)[0, -3:])
    assert torch.equal(batched, torch.stack(alone))
    image_total, video_total = processor_counts(case)
    image_row = int((case.image_inputs["input_ids"] == case.image_token_id).sum())
    assert report.video_tokens_total == [video_total, 0]
    assert report.image_tokens_total == [image_total, image_row]
    if video_total:  # a batch holding both kinds also sums them
        assert "video tokens kept" in report.summary() and "visual tokens kept" in report.summary()


def test_visual_head_scores_include_the_attention_on_video_tokens():
    case = cached_video_case("qwen2_vl", "eager")
    inputs = case.video_inputs
    stats = calibrate(case.model, [inputs], window_size=8)
    attentions = case.model(**inputs, output_attentions=True).attentions
    is_video = inputs["input_ids"][0] == case.video_token_id
    expected = torch.stack([a[0, :, -8:, :][..., is_video].sum(-1).mean(-1) for a in attentions])
    assert stats.visual_head_scores is not None
    assert torch.allclose(stats.visual_head_scores, expected, atol=1e-6)
    assert bool((stats.visual_head_scores > 0).all())
