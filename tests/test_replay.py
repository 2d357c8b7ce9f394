"""A kvpress-style press replayed on a recorded full-cache prefill equals its own prefill.

kvpress itself is exercised where it is installed (CI installs it beside the oldest supported
transformers, which kvpress 0.5 requires); a press written here with kvpress's hook protocol
covers the mechanics everywhere.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from mixkv.eval.replay import prefill_with_inputs, recording_attention_inputs, replayed_prefill
from mixkv.eval.tasks import make_examples
from mixkv.eval.text_example_run import prefill_shared_prefix, prompt_ids, run_example
from mixkv.presses.registry import build_press, kvpress_available
from tests.helpers_tiny import SMALL_GRID, grid_run_twice


@pytest.fixture(scope="module")
def example(tiny):
    return make_examples("niah_single_1", tiny[1], 160, 1)[0]


class HookPress:
    """kvpress's protocol: forward hooks with keyword inputs on the attention modules that, during
    a prefill from position 0, keep the ``keep`` positions whose layer input has the largest norm
    (so the result depends on the inputs over the whole prompt, not only on the cache)."""

    def __init__(self, keep: int = 48, pre_hook: bool = False):
        self.keep, self.pre_hook = keep, pre_hook

    def hook(self, module, args, kwargs, output):
        hidden = kwargs["hidden_states"]
        positions = kwargs.get("cache_position", kwargs["position_ids"][0])  # transformers < 5.24 / later
        if int(positions[-1]) + 1 != hidden.shape[1]:
            return output
        cache = kwargs["past_key_values"] if "past_key_values" in kwargs else kwargs["cache"]
        layer = cache.layers[module.layer_idx]
        kept = hidden[0].norm(dim=-1).topk(self.keep).indices.sort().values
        layer.keys, layer.values = layer.keys[:, :, kept].clone(), layer.values[:, :, kept].clone()
        return output

    @contextlib.contextmanager
    def __call__(self, model):
        attention = [layer.self_attn for layer in model.model.layers]
        handles = [m.register_forward_hook(self.hook, with_kwargs=True) for m in attention]
        if self.pre_hook:
            handles.append(attention[0].register_forward_pre_hook(lambda *a: None))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _recorded(tiny, example, protocol="query_aware", tail=16):
    model, tokenizer = tiny
    ids, n_prefill = prompt_ids(example, tokenizer, protocol, model.device)
    prefix = prefill_shared_prefix(
        model, tokenizer, example, protocol=protocol, tail_tokens=tail, record_inputs=True
    )
    return prefill_with_inputs(model, ids, n_prefill, prefix)


def test_recorded_inputs_of_prefix_and_tail_join_into_those_of_one_prefill(tiny, example):
    model, tokenizer = tiny
    ids, n_prefill = prompt_ids(example, tokenizer, "query_aware", model.device)
    joined = _recorded(tiny, example)
    with torch.inference_mode(), recording_attention_inputs(model) as one_go:
        model(input_ids=ids[:, :n_prefill])
    assert joined.tokens == n_prefill and len(joined.attention_inputs) == len(model.model.layers)
    for module, (inputs,) in one_go.items():
        got = joined.attention_inputs[module]
        torch.testing.assert_close(got["hidden_states"], inputs["hidden_states"], rtol=1e-4, atol=1e-5)
        for ours, theirs in zip(got["position_embeddings"], inputs["position_embeddings"], strict=True):
            torch.testing.assert_close(ours, theirs)
        for key in {"cache_position", "position_ids"} & set(inputs):
            assert torch.equal(got[key], inputs[key]) and int(got[key].flatten()[-1]) == n_prefill - 1
        assert got["attention_mask"] is None


def _scratch_and_replayed(tiny, example, protocol, make_press):
    """Records of a fresh ``make_press()`` prefilling the example itself, and of another replayed
    on the example's recorded prefill."""
    model, tokenizer = tiny
    scratch, replayed = (
        run_example(
            model, tokenizer, example, make_press(), protocol=protocol, max_new_tokens=6, recorded=recorded
        )
        for recorded in (None, _recorded(tiny, example, protocol))
    )
    return scratch, replayed


@pytest.mark.parametrize("protocol", ["query_aware", "query_agnostic"])
def test_a_replayed_press_answers_and_keeps_what_its_own_prefill_does(tiny, example, protocol):
    scratch, replayed = _scratch_and_replayed(tiny, example, protocol, HookPress)
    assert replayed["output"] == scratch["output"] and replayed["new_tokens"] == scratch["new_tokens"]
    assert replayed["kept_tokens_mean"] == scratch["kept_tokens_mean"] == 48
    assert replayed["kv_bytes"] == scratch["kv_bytes"] and replayed["prefill_replayed"] is True


def test_a_replay_compresses_a_copy_and_leaves_the_recorded_cache_whole(tiny, example):
    model, _ = tiny
    recorded = _recorded(tiny, example)
    with replayed_prefill(model, HookPress(keep=10), recorded) as (cache, _):
        assert cache.layers[0].keys.shape[2] == 10
    assert recorded.cache.layers[0].keys.shape[2] == recorded.tokens
    assert not any(m._forward_hooks for m in model.modules())


def test_a_press_with_pre_hooks_is_refused_and_removed(tiny, example):
    model, _ = tiny
    with (
        pytest.raises(ValueError, match=r"pre-hooks.*--no-shared-prefill"),
        replayed_prefill(model, HookPress(pre_hook=True), _recorded(tiny, example)),
    ):
        pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_recording_of_another_length_is_refused(tiny, example):
    model, tokenizer = tiny
    recorded = _recorded(tiny, example, protocol="query_agnostic")
    with pytest.raises(ValueError, match="prefill tokens but this example prefills"):
        run_example(model, tokenizer, example, HookPress(), protocol="query_aware", recorded=recorded)


def test_a_recording_is_refused_for_a_mixkv_press(tiny, example):
    model, tokenizer = tiny
    press = build_press("snapkv", budget=40, context_tokens=160, window_size=8)
    with pytest.raises(ValueError, match="mixkv presses continue from a shared prefix"):
        run_example(model, tokenizer, example, press, recorded=_recorded(tiny, example))


needs_kvpress = pytest.mark.skipif(not kvpress_available(), reason="kvpress is not installed")


@needs_kvpress
@pytest.mark.parametrize("method", ["kvpress-snapkv", "kvpress-adakv", "kvpress-keydiff"])
@pytest.mark.parametrize("protocol", ["query_aware", "query_agnostic"])
def test_kvpress_replayed_equals_kvpress_prefilling_itself(tiny, example, method, protocol):
    model, tokenizer = tiny
    _, n_prefill = prompt_ids(example, tokenizer, protocol, model.device)

    def press():
        return build_press(method, budget=40, context_tokens=n_prefill, window_size=8)

    scratch, replayed = _scratch_and_replayed(tiny, example, protocol, press)
    for key in ("output", "new_tokens", "kept_tokens_mean", "kv_bytes"):
        assert replayed[key] == scratch[key], key


@needs_kvpress
def test_a_grid_replays_kvpress_cells_with_the_scores_of_prefilling_them(tiny, tmp_path):
    cells = grid_run_twice(tiny, tmp_path, ["kvpress-snapkv", "kvpress-adakv"], share_prefill=False)
    assert len(cells) == 2
    for _, ours, theirs in cells:
        assert [e["output"] for e in ours] == [e["output"] for e in theirs]
        assert all(e["prefill_replayed"] for e in ours) and not any("prefill_replayed" in e for e in theirs)


@needs_kvpress
def test_kvpress_head_masks_of_one_replay_do_not_leak_into_the_next(tiny, example):
    # kvpress's AdaKV leaves the keys to mask on the attention modules; its attention patch clears
    # them only when a prefill passes through it, which a replay does not do.
    model, tokenizer = tiny
    _, n_prefill = prompt_ids(example, tokenizer, "query_aware", model.device)
    recorded = _recorded(tiny, example)

    def run(method, replay):
        press = build_press(method, budget=40, context_tokens=n_prefill, window_size=8)
        return run_example(
            model,
            tokenizer,
            example,
            press,
            protocol="query_aware",
            max_new_tokens=6,
            recorded=recorded if replay else None,
        )

    scratch = run("kvpress-snapkv", replay=False)
    run("kvpress-adakv", replay=True)
    assert run("kvpress-snapkv", replay=True)["output"] == scratch["output"]
    run("kvpress-adakv", replay=False)
    assert run("kvpress-snapkv", replay=True)["output"] == scratch["output"]


@needs_kvpress
@pytest.mark.parametrize("replay", [False, True])
def test_a_kvpress_cell_leaves_no_masks_for_the_cells_after_it(tiny, example, replay):
    # kvpress's attention patch would apply them to any later forward whose queries are fewer than
    # its keys, such as the tail of a mixkv cell continuing a shared prefix.
    model, tokenizer = tiny
    _, n_prefill = prompt_ids(example, tokenizer, "query_aware", model.device)
    prefix = prefill_shared_prefix(model, tokenizer, example, protocol="query_aware", tail_tokens=16)

    def mixkv_cell():
        press = build_press("snapkv", budget=40, context_tokens=n_prefill, window_size=8)
        return run_example(
            model, tokenizer, example, press, protocol="query_aware", max_new_tokens=6, prefix=prefix
        )

    before = mixkv_cell()
    adakv = build_press("kvpress-adakv", budget=40, context_tokens=n_prefill, window_size=8)
    recorded = _recorded(tiny, example) if replay else None
    run_example(model, tokenizer, example, adakv, protocol="query_aware", max_new_tokens=6, recorded=recorded)
    assert all(getattr(m, "masked_key_indices", None) is None for m in model.modules())
    after = mixkv_cell()
    assert after["output"] == before["output"] and after["kv_bytes"] == before["kv_bytes"]


def _shortened_cache(model, ids, held, eager=False):
    """A cache of the first ``ids.shape[1]`` tokens keeping only the positions ``held``, as a
    kvpress press leaves it (its length is the number of entries kept)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, held], layer.values[:, :, held]
    return cache


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_question_fed_in_one_forward_over_a_shortened_cache_equals_feeding_it_token_by_token(
    implementation,
):
    from mixkv.eval.generation import held_then_causal_mask
    from tests.helpers_tiny import tiny_llama

    model = tiny_llama(64, seed=1)
    model.config._attn_implementation = implementation
    ids = torch.randint(4, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    held = torch.tensor([0, 1, 2, 7, 11, 20, 25, 26, 27, 28, 29])
    one_by_one, together = (
        _shortened_cache(model, ids[:, :30], held),
        _shortened_cache(model, ids[:, :30], held),
    )
    positions = torch.arange(30, 40)
    with torch.inference_mode():
        steps = [
            model(input_ids=ids[:, [p]], position_ids=positions[None, [i]], past_key_values=one_by_one).logits
            for i, p in enumerate(positions.tolist())
        ]
        mask = held_then_causal_mask(model, len(held), 10)
        fed = model(
            input_ids=ids[:, 30:], position_ids=positions[None], attention_mask=mask, past_key_values=together
        ).logits
    torch.testing.assert_close(fed, torch.cat(steps, dim=1), rtol=1e-4, atol=1e-5)


def test_greedy_decoding_over_a_shortened_cache_answers_as_token_by_token_feeding():
    from mixkv.eval.generation import greedy_with_positions
    from tests.helpers_tiny import scale_weight_matrices, tiny_llama

    # Sharp logits: the answer depends on what the question attends to.
    model = scale_weight_matrices(tiny_llama(64, seed=1), 6)
    ids = torch.randint(4, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    held = torch.tensor([0, 1, 2, 7, 11, 20, 25, 26, 27, 28, 29])
    answer = greedy_with_positions(model, _shortened_cache(model, ids[:, :30], held), ids, 30, 6, set())
    cache, position, token, expected = _shortened_cache(model, ids[:, :30], held), 30, None, []
    with torch.inference_mode():
        for fed in [*ids[0, 30:].tolist(), *([None] * 5)]:
            token = fed if fed is not None else token
            logits = model(
                input_ids=torch.tensor([[token]]),
                position_ids=torch.tensor([[position]]),
                past_key_values=cache,
            ).logits
            position += 1
            if position >= 40:
                token = int(logits[0, -1].argmax())
                expected.append(token)
    assert answer.tolist() == expected


@needs_kvpress
def test_kvpress_cells_of_both_protocols_replay_one_shared_prefix_as_their_own_runs_do(tiny, tmp_path):
    from mixkv.eval.runner import run_eval

    grid = {**SMALL_GRID, "methods": ["kvpress-snapkv", "kvpress-adakv", "mixkv-snapkv", "full"]}
    both = run_eval(tiny, out_dir=tmp_path / "both", protocol=["query_aware", "query_agnostic"], **grid)
    for protocol in ("query_aware", "query_agnostic"):
        alone = run_eval(tiny, out_dir=tmp_path / protocol, protocol=protocol, **grid)
        expected = {str(c["cell"]): [e["output"] for e in c["examples"]] for c in alone.cells}
        mine = [c for c in both.cells if c["identity"]["protocol"] == protocol]
        assert {str(c["cell"]): [e["output"] for e in c["examples"]] for c in mine} == expected
        assert all(
            e.get("prefill_replayed")
            for c in mine
            if c["cell"]["method"].startswith("kvpress")
            for e in c["examples"]
        )


def _batch_and_alone(tiny, example, protocol, make_press):
    """Records of a kvpress-style press decoded in one batch with a mixkv press, and decoded alone,
    both replayed on the same recorded prefill."""
    from mixkv.eval.text_example_run import run_examples_together

    model, tokenizer = tiny
    ids, n_prefill = prompt_ids(example, tokenizer, protocol, model.device)
    prefix = prefill_shared_prefix(
        model, tokenizer, example, protocol=protocol, tail_tokens=16, record_inputs=True
    )
    recorded = prefill_with_inputs(model, ids, n_prefill, prefix)
    ours = build_press("snapkv", budget=40, context_tokens=n_prefill, window_size=8)
    batch, _ = run_examples_together(
        model, tokenizer, example, [make_press(), ours], protocol=protocol, max_new_tokens=6,
        prefix=prefix, recorded=recorded,
    )  # fmt: skip
    alone = run_example(
        model, tokenizer, example, make_press(), protocol=protocol, max_new_tokens=6, recorded=recorded
    )
    return batch, alone


KEPT = ("output", "new_tokens", "kept_tokens_mean", "kv_bytes", "kv_bytes_full", "kv_fraction")


@pytest.mark.parametrize("protocol", ["query_aware", "query_agnostic"])
def test_a_replayed_press_decoded_in_a_batch_answers_and_keeps_as_alone(tiny, example, protocol):
    batch, alone = _batch_and_alone(tiny, example, protocol, HookPress)
    for key in (*KEPT, "kv_bytes_after_decoding", "prefill_replayed", "shared_prefix_tokens"):
        assert batch[key] == alone[key], key
    assert batch["kept_tokens_mean"] == 48 and batch["decode_batch"] == 2


def test_a_replayed_press_joins_a_batch_only_with_the_recorded_prefill(tiny, example):
    from mixkv.eval.text_example_run import run_examples_together

    model, tokenizer = tiny
    _, n_prefill = prompt_ids(example, tokenizer, "query_aware", model.device)
    ours = build_press("snapkv", budget=40, context_tokens=n_prefill, window_size=8)
    with pytest.raises(ValueError, match="recorded full-cache prefill"):
        run_examples_together(model, tokenizer, example, [HookPress(), ours], protocol="query_aware")


@needs_kvpress
@pytest.mark.parametrize("method", ["kvpress-snapkv", "kvpress-keydiff"])
@pytest.mark.parametrize("protocol", ["query_aware", "query_agnostic"])
def test_kvpress_decoded_in_a_batch_answers_and_keeps_as_alone(tiny, example, method, protocol):
    _, n_prefill = prompt_ids(example, tiny[1], protocol, tiny[0].device)

    def press():
        return build_press(method, budget=40, context_tokens=n_prefill, window_size=8)

    batch, alone = _batch_and_alone(tiny, example, protocol, press)
    for key in KEPT:
        assert batch[key] == alone[key], key


@needs_kvpress
def test_a_kvpress_press_that_masks_keys_is_refused_from_a_batch_and_leaves_no_masks(tiny, example):
    _, n_prefill = prompt_ids(example, tiny[1], "query_aware", tiny[0].device)
    with pytest.raises(ValueError, match="masks keys while decoding"):
        _batch_and_alone(
            tiny, example, "query_aware",
            lambda: build_press("kvpress-adakv", budget=40, context_tokens=n_prefill, window_size=8),
        )  # fmt: skip
    assert all(getattr(m, "masked_key_indices", None) is None for m in tiny[0].modules())


@needs_kvpress
def test_a_grid_decodes_kvpress_cells_that_keep_a_plain_cache_in_the_batch(tiny, tmp_path):
    methods = ["kvpress-snapkv", "kvpress-adakv", "kvpress-keydiff", "mixkv-snapkv", "full"]
    cells = grid_run_twice(tiny, tmp_path, methods, batch_decoding=False)
    for cell, ours, theirs in cells:
        assert [e["output"] for e in ours] == [e["output"] for e in theirs], cell
        batched = None if cell["method"] == "kvpress-adakv" else 4
        assert [e.get("decode_batch") for e in ours] == [batched] * 2, cell


@pytest.fixture
def aligned_queries(tiny):
    """The tiny model with every query sharing one large component in its slowest-rotating
    dimensions, as trained models' queries do: kvpress then finds fake keys that cancel a whole
    question's queries at once (for random queries it finds none)."""
    model = tiny[0]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    offset = torch.zeros(model.config.num_attention_heads, head_dim)
    offset[:, head_dim // 2 - 1] = offset[:, -1] = 50.0
    handles = [
        layer.self_attn.q_proj.register_forward_hook(lambda module, args, out: out + offset.flatten())
        for layer in model.model.layers
    ]
    yield tiny
    for handle in handles:
        handle.remove()


def _adakv_question_after_compression(tiny, example):
    """kvpress's AdaKV under the query-agnostic protocol: the question comes after its head-wise
    masks are set, so it is fed over a cache whose keys kvpress replaces by fake ones."""
    model, tokenizer = tiny
    _, n_prefill = prompt_ids(example, tokenizer, "query_agnostic", model.device)
    press = build_press("kvpress-adakv", budget=40, context_tokens=n_prefill, window_size=8)
    return run_example(model, tokenizer, example, press, protocol="query_agnostic", max_new_tokens=6)


def _spied_search(monkeypatch, fail_at: int | None = None, groups: int = 1):
    """Record how many queries each of kvpress's fake-key searches cancels; with ``fail_at``,
    the ``fail_at``-th search for more than ``groups`` queries (one token's) fails, as kvpress's
    does when it finds no fake key."""
    import kvpress.attention_patch as patch

    original, queries = patch.search_hyperplane, []

    def search(x, *args, **kwargs):
        queries.append(x.shape[1])
        if fail_at is not None and sum(q > groups for q in queries) == fail_at and x.shape[1] > groups:
            raise ValueError("Could not find fake keys such that for every query q, exp(<q, k>) = 0")
        return original(x, *args, **kwargs)

    monkeypatch.setattr(patch, "search_hyperplane", search)
    return queries


def _groups(model):
    return model.config.num_attention_heads // model.config.num_key_value_heads


@needs_kvpress
def test_a_question_over_kvpress_masked_keys_is_fed_in_one_forward(aligned_queries, example, monkeypatch):
    queries = _spied_search(monkeypatch)
    record = _adakv_question_after_compression(aligned_queries, example)
    question = record["prompt_tokens"] - record["prefill_tokens"]
    layers = aligned_queries[0].config.num_hidden_layers
    assert question > 1 and queries.count(_groups(aligned_queries[0]) * question) == layers
    assert len(queries) == layers * record["new_tokens"]  # the question's forward, then one per new token


@needs_kvpress
def test_where_kvpress_finds_no_fake_key_for_the_whole_question_it_is_fed_token_by_token(
    aligned_queries, example, monkeypatch
):
    groups, layers = _groups(aligned_queries[0]), aligned_queries[0].config.num_hidden_layers
    together = _adakv_question_after_compression(aligned_queries, example)
    # the last layer's search fails, after the layers before it took the question into the cache
    queries = _spied_search(monkeypatch, fail_at=layers, groups=groups)
    alone = _adakv_question_after_compression(aligned_queries, example)
    question = alone["prompt_tokens"] - alone["prefill_tokens"]
    assert layers > 1 and sum(q > groups for q in queries) == layers
    assert len(queries) == layers + layers * (question + alone["new_tokens"] - 1)
    assert alone["output"] == together["output"]
    assert alone["kv_bytes_after_decoding"] == together["kv_bytes_after_decoding"]
