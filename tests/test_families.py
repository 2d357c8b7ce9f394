"""The tiny model fixtures of ``tests/families.py`` build, run and generate for every family."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from tests.families import ALL_FAMILIES, LLM_FAMILIES, VLM_FAMILIES, VOCAB_SIZE, FamilyCase, build_case

LEFT_PAD = 5
BATCH = 3


@functools.cache
def _case(name: str, attn: str = "sdpa", seed: int = 0, batch_size: int = 1, left_pad: int = 0) -> FamilyCase:
    return build_case(name, attn_implementation=attn, seed=seed, batch_size=batch_size, left_pad=left_pad)


def _model(case: FamilyCase) -> Any:
    return case.model


@torch.no_grad()
def _logits(case: FamilyCase, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    return _model(case)(**(case.inputs if inputs is None else inputs)).logits


@torch.no_grad()
def _generate(case: FamilyCase, new_tokens: int = 4) -> torch.Tensor:
    out = _model(case).generate(**case.inputs, max_new_tokens=new_tokens, do_sample=False)
    return out[:, case.inputs["input_ids"].shape[1] :]


def test_family_lists() -> None:
    assert set(LLM_FAMILIES) | set(VLM_FAMILIES) == set(ALL_FAMILIES)
    assert not set(LLM_FAMILIES) & set(VLM_FAMILIES)
    assert len(ALL_FAMILIES) == len(set(ALL_FAMILIES))


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_builds_and_generates(name: str) -> None:
    case = _case(name)
    ids = case.inputs["input_ids"]
    assert case.name == name
    assert case.is_vlm == (name in VLM_FAMILIES)
    assert not case.model.training
    assert next(case.model.parameters()).dtype == torch.float32
    assert ids.shape[0] == 1
    assert 100 <= ids.shape[1] <= 200, ids.shape
    assert int(ids.max()) < VOCAB_SIZE and int(ids.min()) >= 0
    assert bool(case.inputs["attention_mask"].all())

    text_config: Any = _model(case).config.get_text_config()
    assert case.num_layers == text_config.num_hidden_layers
    assert case.num_kv_heads == text_config.num_key_value_heads
    assert case.head_dim * text_config.num_attention_heads > 0
    if name not in ("phi3",):  # Phi3 derives head_dim from hidden_size / heads
        assert case.num_kv_heads < text_config.num_attention_heads  # GQA

    logits = _logits(case)
    assert logits.shape[:2] == ids.shape
    assert torch.isfinite(logits).all()

    new = _generate(case)
    assert new.shape == (1, 4)
    assert int(new.max()) < VOCAB_SIZE

    # the cache holds one entry per prompt token for every decoder layer
    with torch.no_grad():
        out = _model(case)(**case.inputs, use_cache=True)
    cache = out.past_key_values
    assert cache is not None
    keys = cache.layers[0].keys
    assert keys.shape[1] == case.num_kv_heads and keys.shape[-1] == case.head_dim


@pytest.mark.parametrize("name", VLM_FAMILIES)
def test_vlm_prompt_has_image_tokens(name: str) -> None:
    case = _case(name)
    assert case.image_token_id is not None
    assert case.image_token_id != case.pad_token_id
    assert case.num_image_tokens >= 30
    assert "pixel_values" in case.inputs
    assert _model(case).config.image_token_id == case.image_token_id


@pytest.mark.parametrize("name", VLM_FAMILIES)
def test_image_tokens_carry_image_features(name: str) -> None:
    """Image placeholders are replaced by non-zero, non-constant features of the picture."""
    case = _case(name)
    with torch.no_grad():
        embeds = _model(case)(**case.inputs, output_hidden_states=True).hidden_states[0][0]
    image = embeds[case.inputs["input_ids"][0] == case.image_token_id]
    assert bool(image.norm(dim=-1).gt(1e-3).all())
    distinct = torch.unique(image, dim=0).shape[0]
    assert distinct >= image.shape[0] // 2  # llava_next/onevision repeat their learned newline vector


@pytest.mark.parametrize("name", LLM_FAMILIES)
def test_llm_has_no_image(name: str) -> None:
    case = _case(name)
    assert case.image_token_id is None and case.num_image_tokens == 0


def test_gemma3_mixes_sliding_and_full_layers() -> None:
    for name in ("gemma3_text", "gemma3"):
        case = _case(name)
        assert case.layer_types is not None
        assert {"sliding_attention", "full_attention"} <= set(case.layer_types)
        assert case.sliding_window is not None and case.sliding_window < case.prompt_len


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_eager_matches_sdpa(name: str) -> None:
    sdpa, eager = _case(name, "sdpa"), _case(name, "eager")
    assert torch.equal(sdpa.inputs["input_ids"], eager.inputs["input_ids"])
    torch.testing.assert_close(_logits(eager), _logits(sdpa), atol=1e-4, rtol=0)
    assert torch.equal(_generate(eager), _generate(sdpa))


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_same_seed_is_deterministic(name: str) -> None:
    first, again = _case(name), build_case(name)
    assert first.inputs.keys() == again.inputs.keys()
    for key, value in first.inputs.items():
        assert torch.equal(value, again.inputs[key]), key
    assert torch.equal(_logits(first), _logits(again))
    other = _case(name, seed=1)
    assert not torch.equal(first.inputs["input_ids"], other.inputs["input_ids"])


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_padded_batch(name: str) -> None:
    case = _case(name, batch_size=BATCH, left_pad=LEFT_PAD)
    ids, mask = case.inputs["input_ids"], case.inputs["attention_mask"]
    assert ids.shape[0] == BATCH and len(case.rows) == BATCH
    assert torch.equal(ids[0], _case(name).inputs["input_ids"][0])
    for i in range(BATCH):
        pad = LEFT_PAD * i
        assert int(mask[i].eq(0).sum()) == pad
        assert bool(ids[i, :pad].eq(case.pad_token_id).all()) and bool(mask[i, pad:].all())
        if i:
            assert not torch.equal(ids[i, pad : pad + 20], ids[0, pad : pad + 20])
        if case.image_token_id is not None:
            assert int(ids[i].eq(case.image_token_id).sum()) == case.num_image_tokens

    # every padded row gives the logits of the same prompt run on its own
    batched = _logits(case)[:, -1]
    for i, row in enumerate(case.rows):
        single = _logits(case, row)[0, -1]
        torch.testing.assert_close(batched[i], single, atol=1e-4, rtol=0)

    new = _generate(case)
    assert new.shape == (BATCH, 4)
