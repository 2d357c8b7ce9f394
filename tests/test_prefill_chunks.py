"""``generate(..., prefill_chunk_size=N)``'s chunks are recognised from transformers' chunk loop.

transformers gives the model no signal telling a prompt chunk from a later forward, so
:mod:`mixkv.integration.prefill_chunks` reads ``GenerationMixin._prefill``'s frame (its
``input_chunks`` and ``chunk_idx``). These tests fail when that loop changes; then update the
frame reading (or use a signal the new release offers).
"""

import pytest
import torch

import mixkv
from mixkv.integration.prefill_chunks import PrefillChunk, generate_prefill_chunk
from tests.helpers_tiny import press_test_llama
from tests.test_press_api import prompt


@pytest.fixture(scope="module")
def model():
    return press_test_llama()


def _chunks_seen(model, ids, chunk_size, new_tokens=3):
    """What the detection says at every forward of a generate call (asked from a model pre-hook,
    as the session asks)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(generate_prefill_chunk())

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, do_sample=False, prefill_chunk_size=chunk_size)
    finally:
        handle.remove()
    return seen


def test_each_chunk_of_generate_is_recognised_and_the_last_closes_the_prompt(model):
    seen = _chunks_seen(model, prompt(150, seed=1), chunk_size=64)
    # Three chunks (64 + 64 + 22), then two decoding forwards.
    assert seen == [
        PrefillChunk(closes_prompt=False),
        PrefillChunk(closes_prompt=False),
        PrefillChunk(closes_prompt=True),
        None,
        None,
    ]


@pytest.mark.parametrize("chunk_size", [None, 150, 512])
def test_a_prompt_in_one_forward_is_no_chunk(model, chunk_size):
    assert _chunks_seen(model, prompt(150, seed=1), chunk_size=chunk_size) == [None, None, None]


def test_a_press_compresses_the_whole_chunked_prompt_not_its_first_chunk(model):
    press = mixkv.SnapKVPress(budget=40, window_size=8)
    with press(model), torch.no_grad():
        model.generate(prompt(300, seed=3), max_new_tokens=1, do_sample=False, prefill_chunk_size=64)
    report = press.last_report
    assert report.context_lengths == [300]  # [64] if the first chunk were taken for the prompt
    assert report.compressed_layers == [0, 1, 2]
    assert report.kept_tokens.float().mean(-1).max() <= 40
