"""The tiny VLM's projector: a saturating lookup from character logits to character embeddings."""

from __future__ import annotations

import torch
from torch import nn

from mixkv.tiny_vlm.images import CHARSET
from mixkv.tiny_vlm.model import llava_config, vision_config
from mixkv.tiny_vlm.train import SHARPNESS, lookup_projector

_HIDDEN = 96  # language-model width of the test: at least one hidden unit per character


def _projector(classifier: nn.Linear, embeddings: torch.Tensor) -> nn.Module:
    from transformers import Qwen2Config
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    text = Qwen2Config(hidden_size=_HIDDEN, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    projector = LlavaMultiModalProjector(llava_config(text, 0))
    projector.load_state_dict(lookup_projector(classifier, embeddings))
    return projector


def _setup(seed: int) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    classifier = nn.Linear(vision_config().hidden_size, len(CHARSET))
    embeddings = torch.randn(len(CHARSET), _HIDDEN)
    features = torch.randn(5, vision_config().hidden_size)
    return classifier, embeddings, features


def test_a_cell_sure_of_one_character_becomes_exactly_its_embedding():
    classifier, embeddings, features = _setup(0)
    target = CHARSET.index("7")
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.fill_(-3.0 / SHARPNESS)  # at the margin: relu6 gives exactly 0
        classifier.bias[target] = 3.0 / SHARPNESS  # at the margin: relu6 gives exactly 6
        out = _projector(classifier, embeddings)(features)
    torch.testing.assert_close(out, embeddings[target].expand_as(out), rtol=0, atol=1e-6)


def test_the_projector_weights_each_embedding_by_its_clipped_logit():
    classifier, embeddings, features = _setup(1)
    with torch.no_grad():
        out = _projector(classifier, embeddings)(features)
        weights = (SHARPNESS * classifier(features) + 3.0).clamp(0.0, 6.0) / 6.0
    torch.testing.assert_close(out, weights @ embeddings, rtol=1e-5, atol=1e-5)
    assert ((weights > 0) & (weights < 1)).any()  # some cells are uncertain: their output is a blend
