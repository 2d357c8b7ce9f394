"""TOVA and ExpectedAttention against kvpress 0.5.5's own presses (skipped without kvpress).

kvpress needs transformers < 5.3, so these run in the transformers-5.2 stage of ``scripts/test.sh``.
TOVA is compared end to end (the same kept entries); ExpectedAttention score for score on the same
queries, since mixkv fits the query Gaussian on the observation window and kvpress on every prompt
query after the sinks.
"""

import pytest
import torch
from transformers import DynamicCache

import mixkv
from mixkv.functional import expected_attention
from mixkv.presses.registry import kvpress_available
from tests.helpers_tiny import press_test_llama

pytestmark = pytest.mark.skipif(not kvpress_available(), reason="kvpress is not installed")

LENGTH = 120


@pytest.fixture(scope="module")
def model():
    return press_test_llama()


def prompt(seed=1):
    return torch.randint(1, 128, (1, LENGTH), generator=torch.Generator().manual_seed(seed))


def held_positions(held_keys, full_keys):
    """``(Hkv, N)`` bool: which positions of ``full_keys`` ``(1, Hkv, N, D)`` ``held_keys`` holds."""
    return (full_keys[0].unsqueeze(2) == held_keys[0].unsqueeze(1)).all(-1).any(-1)


def test_tova_keeps_the_entries_kvpress_tova_keeps(model):
    import kvpress

    ids = prompt()
    full = DynamicCache(config=model.config)
    model(ids, past_key_values=full)
    theirs = DynamicCache(config=model.config)
    with kvpress.TOVAPress(compression_ratio=0.75)(model):
        model(ids, past_key_values=theirs)
    ours = DynamicCache(config=model.config)
    with mixkv.TOVAPress(compression_ratio=0.75)(model):  # window_size=1, as kvpress keeps the last token
        model(ids, past_key_values=ours)
    for layer_idx, full_layer in enumerate(full.layers):
        assert theirs.layers[layer_idx].keys.shape[2] == ours.layers[layer_idx].keys.shape[2] == 30
        assert torch.equal(
            held_positions(theirs.layers[layer_idx].keys, full_layer.keys),
            held_positions(ours.layers[layer_idx].keys, full_layer.keys),
        )


def layer_inputs(model, ids):
    """Per layer: the attention module's input hidden states and rotary tables; and the full cache."""
    seen = {}
    handles = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: seen.__setitem__(i, kwargs), with_kwargs=True
        )
        for i, layer in enumerate(model.model.layers)
    ]
    cache = DynamicCache(config=model.config)
    try:
        model(ids, past_key_values=cache)
    finally:
        for handle in handles:
            handle.remove()
    return seen, cache


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_covariance": False},
        {"use_vnorm": False},
        {"epsilon": 0.01, "n_sink": 2, "n_future_positions": 64},
    ],
    ids=["defaults", "no-covariance", "no-vnorm", "epsilon-sinks-future"],
)
def test_expected_attention_scores_equal_kvpress_expected_attention_on_the_same_queries(model, options):
    import kvpress

    ids = prompt(2)
    inputs, cache = layer_inputs(model, ids)
    press = kvpress.ExpectedAttentionPress(compression_ratio=0.5, **options)
    n_sink = press.n_sink
    for layer_idx, kwargs in inputs.items():
        attn = model.model.layers[layer_idx].self_attn
        attn.rotary_emb = model.model.rotary_emb
        try:
            hidden = kwargs["hidden_states"]
            keys, values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
            theirs = press.score(attn, hidden, keys, values, None, kwargs)
        finally:
            del attn.rotary_emb
        pre_q = attn.q_proj(hidden[:, n_sink:]).view(1, LENGTH - n_sink, 4, 16).transpose(1, 2)
        future = torch.arange(LENGTH, LENGTH + press.n_future_positions)[None]
        future_cos, future_sin = model.model.rotary_emb(hidden, future)
        ours = expected_attention(
            pre_q,
            keys,
            values,
            future_cos,
            future_sin,
            1,
            n_sink=n_sink,
            use_covariance=press.use_covariance,
            use_vnorm=press.use_vnorm,
            epsilon=press.epsilon,
            scaling=attn.scaling,
        )
        scored = slice(n_sink, LENGTH - 1)
        torch.testing.assert_close(ours[..., scored], theirs[..., scored].float(), atol=1e-7, rtol=1e-4)
        # Both keep the sinks above everything else.
        assert (ours[..., :n_sink].amin(-1) > ours[..., n_sink:].amax(-1)).all()
        assert (theirs[..., :n_sink].amin(-1) > theirs[..., n_sink:].amax(-1)).all()
