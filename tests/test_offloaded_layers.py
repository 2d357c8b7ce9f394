"""Presses on a model whose layers are offloaded by accelerate: a ``device_map`` with ``"disk"``
entries, and ``accelerate.cpu_offload`` (every weight streamed from a CPU copy).

accelerate keeps an offloaded layer's weights on the meta device and loads them for each forward
through hooks on the modules; a press's own hooks and attention function sit beside those and must
give exactly the outputs (and keep exactly the entries) of the same model kept whole in memory.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mixkv
from tests.helpers_tiny import press_test_llama

pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    whole = press_test_llama()
    folder = tmp_path_factory.mktemp("tiny-llama")
    whole.save_pretrained(folder)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    for layer in range(whole.config.num_hidden_layers):
        device_map[f"model.layers.{layer}"] = "disk" if layer % 2 else "cpu"
    on_disk = AutoModelForCausalLM.from_pretrained(
        folder,
        device_map=device_map,
        offload_folder=tmp_path_factory.mktemp("offload"),
        attn_implementation="sdpa",
    )
    from accelerate import cpu_offload

    streamed = cpu_offload(copy.deepcopy(whole), execution_device=torch.device("cpu"))
    return whole, {"disk": on_disk, "cpu_offload": streamed}


@pytest.mark.parametrize("kind", ["disk", "cpu_offload"])
def test_the_offloaded_model_really_keeps_layers_off_memory(models, kind):
    _, offloaded = models
    assert offloaded[kind].model.layers[1].self_attn.q_proj.weight.device.type == "meta"


@pytest.mark.parametrize("kind", ["disk", "cpu_offload"])
@pytest.mark.parametrize(
    "press",
    [
        mixkv.SnapKVPress(budget=40, window_size=8),
        mixkv.MixKVPress(budget=40, window_size=8),
        mixkv.PyramidKVPress(budget=40, window_size=8),
        mixkv.AdaKVPress(budget=40, window_size=8),
        mixkv.MixKVPress(budget=40, window_size=8, base="adakv"),
    ],
    ids=["snapkv", "mixkv-snapkv", "pyramidkv", "adakv", "mixkv-adakv"],
)
def test_a_press_on_offloaded_layers_answers_as_on_the_whole_model(models, press, kind):
    whole, models_by_kind = models
    offloaded = models_by_kind[kind]
    ids = torch.randint(4, whole.config.vocab_size, (1, 120), generator=torch.Generator().manual_seed(1))
    with press(whole):
        expected = whole.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    kept = press.last_report.kept_tokens.clone()
    press.last_report = None  # the offloaded run must write its own
    with press(offloaded):
        answer = offloaded.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(answer.sequences, expected.sequences)
    assert press.last_report is not None and press.last_report.compressed_layers
    assert torch.equal(press.last_report.kept_tokens, kept)
    for got, wanted in zip(answer.past_key_values.layers, expected.past_key_values.layers, strict=True):
        assert torch.equal(got.entries()[0], wanted.entries()[0])  # the same entries kept
