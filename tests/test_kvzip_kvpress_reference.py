"""KVzip against kvpress 0.5.5's own ``KVzipPress`` (skipped without kvpress).

kvpress needs transformers < 5.3, so this runs in the transformers-5.2 stage of ``scripts/test.sh``.
kvpress loads the tokenizer from the model's directory, so the tiny Llama and the word tokenizer are
saved to a temporary one first. The scores are compared value for value (one reconstruction chunk
and several); the kept entries with kvpress's default layout (every layer and head pooled), which is
mixkv's ``allocation="global"``, and with its ``layerwise=True`` (each layer's heads pooled), which
is ``allocation="adakv"`` with ``floor_ratio=0``; each on a prompt where kvpress happens to keep the
last token, which mixkv always keeps (its observation window of one token).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import mixkv
from mixkv.integration import kvzip_prompt_ids
from mixkv.presses.registry import kvpress_available
from tests.helpers_tiny import random_llama, word_tokenizer
from tests.reference import kept_positions

pytestmark = pytest.mark.skipif(not kvpress_available(), reason="kvpress is not installed")

LENGTH = 40


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    random_llama(len(tokenizer), layers=2, seed=0, initializer_range=0.2).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()


def prompt(tokenizer, seed=0):
    return torch.randint(8, len(tokenizer), (1, LENGTH), generator=torch.Generator().manual_seed(seed))


def kvpress_run(model, ids, **options):
    """kvpress's scores ``(L, Hkv, N)`` (before its sinks are raised) and kept mask ``(L, Hkv, N)``."""
    import kvpress

    press = kvpress.KVzipPress(**options)
    scores = []
    compress_post = press.compress_post

    def keep_scores(model):
        scores.append(press.score_val[:, 0].float().clone())
        compress_post(model)

    press.compress_post = keep_scores
    with torch.no_grad(), press(model):
        model(input_ids=ids, past_key_values=DynamicCache(config=model.config))
    kept = torch.ones(scores[0].shape, dtype=torch.bool)
    for layer_idx, layer in enumerate(model.model.layers):
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        if masked is not None:
            _, heads, positions = masked
            kept[layer_idx, heads.cpu(), positions.cpu()] = False
            layer.self_attn.masked_key_indices = None
    return scores[0], kept


class ScoreCapture(mixkv.KVzipPress):
    """KVzipPress that keeps the reconstruction scores each layer was compressed with."""

    seen: dict

    def scores(self, ctx):
        self.seen[ctx.layer_idx] = ctx.reconstruction_scores[0].clone()
        return super().scores(ctx)


@pytest.mark.parametrize("chunk_size", [2048, 16])
def test_scores_equal_kvpress_kvzip_scores(model, tokenizer, chunk_size):
    ids = prompt(tokenizer)
    theirs, _ = kvpress_run(model, ids, compression_ratio=0.5, chunk_size=chunk_size)
    press = ScoreCapture(budget=20, window_size=1, chunk_size=chunk_size, **kvzip_prompt_ids(tokenizer))
    press.seen = {}
    with torch.no_grad(), press(model):
        model(ids, past_key_values=DynamicCache(config=model.config))
    for layer_idx in range(2):
        torch.testing.assert_close(press.seen[layer_idx], theirs[layer_idx], rtol=1e-5, atol=1e-7)


def test_adakv_allocation_without_floor_keeps_the_entries_kvpress_layerwise_kvzip_keeps(model, tokenizer):
    # A prompt where kvpress keeps the last token in every head: mixkv always keeps it (the window),
    # kvpress scores it like the others, so on other prompts the two differ by that token's slot.
    ids = prompt(tokenizer, seed=4)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=full)
    _, theirs = kvpress_run(model, ids, compression_ratio=0.25, layerwise=True)
    assert theirs[:, :, -1].all()
    press = mixkv.KVzipPress(
        budget=30, window_size=1, allocation="adakv", floor_ratio=0.0, **kvzip_prompt_ids(tokenizer)
    )
    ours = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, past_key_values=ours)
    for layer_idx in range(2):
        kept = kept_positions(ours.layers[layer_idx], full.layers[layer_idx].keys)[0]
        assert int(kept.sum()) == int(theirs[layer_idx].sum()) == 2 * 30
        assert torch.equal(kept, theirs[layer_idx])
    assert not torch.equal(theirs[0, 0], theirs[0, 1])  # the heads keep different positions


def test_global_allocation_keeps_the_entries_kvpress_default_kvzip_keeps(model, tokenizer):
    # kvpress's default pools every layer and head; on this prompt it keeps the last token everywhere.
    ids = prompt(tokenizer, seed=8)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=full)
    _, theirs = kvpress_run(model, ids, compression_ratio=0.25)
    assert theirs[:, :, -1].all()
    press = mixkv.KVzipPress(budget=30, window_size=1, allocation="global", **kvzip_prompt_ids(tokenizer))
    ours = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, past_key_values=ours)
    for layer_idx in range(2):
        kept = kept_positions(ours.layers[layer_idx], full.layers[layer_idx].keys)[0]
        assert torch.equal(kept, theirs[layer_idx])
    assert int(theirs.sum()) == 2 * 2 * 30
    assert theirs[0].sum() != theirs[1].sum()  # the layers keep different numbers
