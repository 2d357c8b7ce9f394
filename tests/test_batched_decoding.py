"""Answers of several presses decoded as one batch equal the answers decoded one press at a time."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from mixkv.eval.tasks import make_examples
from mixkv.eval.text_example_run import prefill_shared_prefix, prompt_ids, run_example, run_examples_together
from mixkv.integration.cache import DenseCompressedLayer, PackedCompressedLayer, stack_layers
from mixkv.presses.decoding import DecodingPress
from mixkv.presses.registry import build_press
from tests.helpers_tiny import grid_run_twice, scale_weight_matrices, tiny_llama, word_tokenizer

METHODS = ["snapkv", "mixkv-snapkv", "pyramidkv", "adakv", "mixkv-adakv", "streamingllm", "random"]
COMPARED = ("output", "new_tokens", "kv_bytes", "kv_bytes_after_decoding", "kept_tokens_mean")


@pytest.fixture(scope="module")
def tiny():
    # Weights 6x the default initialisation: the answers of a default tiny model barely depend on
    # the cache (mostly one word repeated), so they would not show a wrong row or position.
    tokenizer = word_tokenizer()
    return scale_weight_matrices(tiny_llama(len(tokenizer), seed=0, layers=3), 6), tokenizer


@pytest.fixture(scope="module")
def example(tiny):
    return make_examples("niah_single_1", tiny[1], 160, 1)[0]


def _presses(tokenizer, example, protocol, methods=METHODS):
    _, n_prefill = prompt_ids(example, tokenizer, protocol, torch.device("cpu"))
    return [build_press(m, 40, context_tokens=n_prefill, window_size=8) for m in methods]


@pytest.mark.parametrize("protocol", ["query_aware", "query_agnostic"])
def test_presses_decoded_together_answer_as_decoded_one_by_one(tiny, example, protocol):
    model, tokenizer = tiny
    prefix = prefill_shared_prefix(model, tokenizer, example, protocol=protocol, tail_tokens=8)
    alone = []
    for press in _presses(tokenizer, example, protocol):
        torch.manual_seed(0)
        alone.append(
            run_example(model, tokenizer, example, press, protocol=protocol, max_new_tokens=6, prefix=prefix)
        )
    together = run_examples_together(
        model, tokenizer, example, _presses(tokenizer, example, protocol), protocol=protocol,
        max_new_tokens=6, prefix=prefix, seed=0,
    )  # fmt: skip
    assert len(together) == len(METHODS)
    for method, one, batch in zip(METHODS, alone, together, strict=True):
        for key in COMPARED:
            assert batch[key] == one[key], (method, key)
        timing = "compression_seconds"
        assert {**batch["report"], timing: 0} == {**one["report"], timing: 0}, method
        assert batch["decode_batch"] == len(METHODS)


def test_answers_that_end_early_leave_the_batch_and_the_others_answer_as_alone(tiny, example, monkeypatch):
    import copy

    from mixkv.integration.cache import PackedCompressedLayer as Packed

    model, tokenizer = tiny
    prefix = prefill_shared_prefix(model, tokenizer, example, protocol="query_aware", tail_tokens=8)

    def together():
        return run_examples_together(
            model, tokenizer, example, _presses(tokenizer, example, "query_aware"), protocol="query_aware",
            max_new_tokens=6, prefix=prefix, seed=0,
        )  # fmt: skip

    free = [tokenizer(r["output"], add_special_tokens=False)["input_ids"] for r in together()]
    ending = next(
        t for answer in free for t in answer[:2] if sum(t in other for other in free) < len(free) / 2
    )
    model = copy.deepcopy(model)  # end-of-sequence: a token some answers say early, most never
    model.generation_config.eos_token_id = ending
    tiny_with_eos = (model, tokenizer)
    selections = []
    original = Packed.select_rows
    monkeypatch.setattr(
        Packed, "select_rows", lambda self, rows: selections.append(rows) or original(self, rows)
    )
    batch = run_examples_together(
        *tiny_with_eos, example, _presses(tokenizer, example, "query_aware"), protocol="query_aware",
        max_new_tokens=6, prefix=prefix, seed=0,
    )  # fmt: skip
    assert selections  # some rows left the batch
    for press, record in zip(_presses(tokenizer, example, "query_aware"), batch, strict=True):
        torch.manual_seed(0)
        alone = run_example(
            *tiny_with_eos, example, press, protocol="query_aware", max_new_tokens=6, prefix=prefix
        )
        assert record["output"] == alone["output"] and record["new_tokens"] == alone["new_tokens"]


def test_a_chunked_prefill_joins_the_batch(tiny, example):
    model, tokenizer = tiny
    prefix = prefill_shared_prefix(model, tokenizer, example, protocol="query_aware", tail_tokens=8)
    presses = _presses(tokenizer, example, "query_aware", ["mixkv-snapkv", "mixkv-adakv"])
    alone = run_example(
        model, tokenizer, example, presses[1], protocol="query_aware", max_new_tokens=6, prefill_chunk_size=64
    )
    together = run_examples_together(
        model, tokenizer, example, _presses(tokenizer, example, "query_aware", ["mixkv-snapkv", "mixkv-adakv"]),
        protocol="query_aware", max_new_tokens=6, prefix=prefix, prefill_chunk_sizes=[None, 64],
    )  # fmt: skip
    assert together[1]["output"] == alone["output"] and together[1]["kv_bytes"] == alone["kv_bytes"]
    assert together[1]["shared_prefix_tokens"] == 0 and together[0]["shared_prefix_tokens"] == prefix.tokens


@pytest.mark.parametrize("press", [None, "decoding"])
def test_a_batch_needs_a_plain_mixkv_press_and_no_decoding_press(tiny, example, press):
    model, tokenizer = tiny
    if press == "decoding":
        press = DecodingPress(_presses(tokenizer, example, "query_aware", ["snapkv"])[0], interval=4)
    with pytest.raises(ValueError, match="plain mixkv press's session"):
        run_examples_together(model, tokenizer, example, [press], protocol="query_aware")


@pytest.mark.parametrize("protocol", ["query_aware", "query_agnostic"])
def test_the_full_cache_decoded_in_the_batch_answers_as_alone(tiny, example, protocol):
    model, tokenizer = tiny
    prefix = prefill_shared_prefix(model, tokenizer, example, protocol=protocol, tail_tokens=8)
    alone = run_example(model, tokenizer, example, None, protocol=protocol, max_new_tokens=6, prefix=prefix)
    presses = [None, *_presses(tokenizer, example, protocol, ["mixkv-snapkv"])]
    full, _ = run_examples_together(
        model, tokenizer, example, presses, protocol=protocol, max_new_tokens=6, prefix=prefix
    )
    for key in (*COMPARED, "kv_bytes_full", "shared_prefix_tokens"):
        assert full[key] == alone[key], key
    assert full["decode_batch"] == 2 and full["report"] is None


def test_the_full_cache_needs_the_shared_prefix_to_join(tiny, example):
    model, tokenizer = tiny
    presses = [None, *_presses(tokenizer, example, "query_aware", ["snapkv"])]
    with pytest.raises(ValueError, match="pass prefix"):
        run_examples_together(model, tokenizer, example, presses, protocol="query_aware")


def test_a_shortened_plain_layer_is_stacked_only_when_allowed_and_attends_as_itself():
    torch.manual_seed(0)
    kept = DynamicLayer()  # 5 of 9 prompt entries, cut in place as kvpress does
    kept.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="5 seen"):
        stack_layers([kept], seen_tokens=9)
    stacked = stack_layers([kept], seen_tokens=9, shortened=True)
    new_keys, new_values, query = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 4, 1, 4)
    stacked.update(new_keys, new_values)
    keys, values = kept.update(new_keys, new_values)
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, scale=0.5, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(stacked.attend(query, 0.5), reference)
    assert stacked.seen_tokens == 10


def test_a_stacked_row_attends_as_the_layer_it_came_from():
    torch.manual_seed(0)
    compressed = DenseCompressedLayer(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), seen_tokens=9)
    full = DynamicLayer()
    full.update(torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4))
    stacked = stack_layers([compressed, full], seen_tokens=9)
    new_keys, new_values, query = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4), torch.randn(2, 4, 1, 4)
    stacked.update(new_keys, new_values)
    out = stacked.attend(query, 0.5)
    compressed.update(new_keys[:1], new_values[:1])
    torch.testing.assert_close(out[:1], compressed.attend(query[:1], 0.5))
    keys, values = full.update(new_keys[1:], new_values[1:])
    reference = torch.nn.functional.scaled_dot_product_attention(
        query[1:], keys, values, scale=0.5, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out[1:], reference)


def test_selected_rows_hold_what_stacking_only_those_rows_holds():
    torch.manual_seed(0)
    rows = []
    for kept in (3, 5, 2):
        mask = torch.zeros(1, 2, 6, dtype=torch.bool)
        mask[0, 0, :kept] = True
        mask[0, 1, -kept - 1 :] = True  # head-wise: another count per head
        keys, values = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
        rows.append(
            PackedCompressedLayer(
                keys[mask], values[mask], mask.sum(-1).flatten(), torch.randn(1, 2, 2, 4),
                torch.randn(1, 2, 2, 4), torch.ones(1, 2, dtype=torch.bool), seen_tokens=9,
            )
        )  # fmt: skip
    stacked = stack_layers(rows, seen_tokens=9)
    stacked.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))  # one decoded token
    selected = stacked.select_rows([2, 0])
    (keys, values, valid), (all_keys, all_values, all_valid) = selected.entries(), stacked.entries()
    for slot, row in enumerate([2, 0]):
        for head in range(2):  # the held entries of each head, in order (padding widths differ)
            assert torch.equal(keys[slot, head][valid[slot, head]], all_keys[row, head][all_valid[row, head]])
            assert torch.equal(
                values[slot, head][valid[slot, head]], all_values[row, head][all_valid[row, head]]
            )
    query = torch.randn(3, 4, 1, 4)
    torch.testing.assert_close(selected.attend(query[[2, 0]], 0.5), stacked.attend(query, 0.5)[[2, 0]])


def test_a_sliding_window_layer_is_not_stacked():
    layer = DynamicSlidingWindowLayer(sliding_window=4)
    layer.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="cannot stack a DynamicSlidingWindowLayer"):
        stack_layers([layer], seen_tokens=3)


def test_a_grid_decodes_its_mixkv_cells_together_with_the_answers_of_one_by_one(tiny, tmp_path):
    methods = ["full", "snapkv", "mixkv-snapkv", "mixkv-adakv"]
    cells = grid_run_twice(tiny, tmp_path, methods, batch_decoding=False)
    assert len(cells) == len(methods)
    for _cell, ours, theirs in cells:
        assert [e["output"] for e in ours] == [e["output"] for e in theirs]
        assert [e.get("decode_batch") for e in ours] == [4] * 2  # the full cache joins the batch
        assert not any("decode_batch" in e for e in theirs)


def test_a_row_that_never_ends_stops_at_the_answer_length_when_another_has_ended(tiny):
    from transformers import DynamicCache

    from mixkv.eval.generation import greedy_batch

    model, _ = tiny
    prompts = torch.randint(4, 60, (2, 30), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([prompts[:1], torch.tensor([[5]])], dim=1)

    def answers(eos):
        cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=prompts, past_key_values=cache, use_cache=True)
            return greedy_batch(model, cache, ids, 30, 2, 6, eos)

    free = answers(set())
    assert free[0][0] not in free[1]  # the first row's first token ends it, never the second row
    ended = answers({free[0][0]})
    assert ended == [free[0][:1], free[1]]
