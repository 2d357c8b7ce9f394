"""The multimodal grid's cells decoded as one batch answer as each cell decoded on its own."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from packaging.version import Version

from mixkv.eval import mm_runner
from mixkv.eval.cell_store import cell_filename
from mixkv.eval.mm_example_run import run_mm_example, run_mm_examples_together
from mixkv.eval.mm_runner import run_mm_eval
from mixkv.eval.synthetic_images import make_synthetic_suite
from mixkv.presses.registry import build_press
from tests.families import build_case, vlm_processor
from tests.helpers_tiny import scale_weight_matrices

torch.set_num_threads(1)

BUDGET = 24
WINDOW = 8
# Every press that continues a shared prefix on a VLM: budgets per layer, per head, modality-aware
# scores, merged values (LOOK-M), a random draw (seeded per press) and the full cache.
METHODS = [
    "full",
    "snapkv",
    "mixkv-snapkv",
    "pyramidkv",
    "adakv",
    "mixkv-adakv",
    "keydiff",
    "streamingllm",
    "random",
    "tova",
    "mixkv-tova",
    "expectedattention",
    "mixkv-expectedattention",
    "vlcache",
    "mixkv-vlcache",
    "lookm",
]
COMPARED = (
    "output",
    "new_tokens",
    "kv_bytes",
    "kv_bytes_full",
    "kv_fraction",
    "kept_tokens_mean",
    "image_tokens_total",
    "image_tokens_kept",
    "shared_prefix_tokens",
    "score",
)


@pytest.fixture(scope="module")
def llava():
    # Weights 4x the default initialisation, so that the answers depend on what the cache kept.
    return scale_weight_matrices(build_case("llava").model, 4), vlm_processor("llava")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return make_synthetic_suite("text_reading", 2, 0, tmp_path_factory.mktemp("images"))


def _presses(methods, context_tokens):
    return [
        None if m == "full" else build_press(m, BUDGET, context_tokens=context_tokens, window_size=WINDOW)
        for m in methods
    ]


def _prepared(model, processor, example, inside_the_image=False):
    """The example's inputs and shared prefix: all but the last WINDOW tokens, or (inside_the_image)
    a tail that starts 4 tokens inside the image, fed as embeddings."""
    inputs = mm_runner.encode_example(processor, example, mm_runner.example_prompt(processor, example))
    ids = inputs["input_ids"][0]
    after_image = int(ids.shape[0] - 1 - (ids == model.config.image_token_id).nonzero().max())
    assert after_image > WINDOW
    tail = after_image + 4 if inside_the_image else WINDOW
    prefix = mm_runner.prefill_image_prefix(model, inputs, tail_tokens=tail)
    assert prefix is not None and (prefix.embeddings is not None) == inside_the_image
    return inputs, prefix


@pytest.mark.parametrize("tail", ["in_the_text", "in_the_image"])
def test_presses_decoded_together_answer_as_decoded_one_by_one(llava, examples, tail):
    model, processor = llava
    for example in examples:
        inputs, prefix = _prepared(model, processor, example, inside_the_image=tail == "in_the_image")
        n = int(inputs["input_ids"].shape[1])
        alone = []
        for press in _presses(METHODS, n):
            torch.manual_seed(0)
            alone.append(
                run_mm_example(
                    model, processor, example, press, max_new_tokens=5, inputs=inputs, prefix=prefix
                )
            )
        together = run_mm_examples_together(
            model, processor, example, _presses(METHODS, n), inputs=inputs, prefix=prefix,
            max_new_tokens=5, seed=0,
        )  # fmt: skip
        assert len(together) == len(METHODS)
        for method, one, batch in zip(METHODS, alone, together, strict=True):
            for key in COMPARED:
                assert batch[key] == one[key], (example.id, method, key)
            if method != "full":
                timing = "compression_seconds"
                assert {**batch["report"], timing: 0} == {**one["report"], timing: 0}, method
                assert batch["image_tokens_kept"] < batch["image_tokens_total"]
            assert batch["decode_batch"] == len(METHODS)
        # The first mixkv press runs the tail's forward; the others compress its recording.
        assert [r.get("prefill_replayed", False) for r in together] == [False, False] + [True] * (
            len(METHODS) - 2
        )
        # Answers differ between presses, so a wrong row would show.
        assert len({r["output"] for r in together}) > 1


def test_presses_that_cannot_continue_a_prefix_are_refused_by_name(llava, examples):
    from mixkv.presses.decoding import DecodingPress

    model, processor = llava
    inputs, prefix = _prepared(model, processor, examples[0])
    n = int(inputs["input_ids"].shape[1])
    snapkv = build_press("snapkv", BUDGET, context_tokens=n, window_size=WINDOW)
    kvzip = build_press("kvzip", BUDGET, context_tokens=n, window_size=WINDOW, tokenizer=processor.tokenizer)
    for other, name in ((kvzip, "KVzipPress"), (DecodingPress(snapkv, interval=4), "DecodingPress")):
        with pytest.raises(ValueError, match=name):
            run_mm_examples_together(
                model, processor, examples[0], [snapkv, other], inputs=inputs, prefix=prefix
            )
    with pytest.raises(ValueError, match="at least one mixkv press"):
        run_mm_examples_together(model, processor, examples[0], [None, None], inputs=inputs, prefix=prefix)


@pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.25"),
    reason="transformers before 5.25 shares no M-RoPE prefix (it would continue it at wrong positions)",
)
def test_an_m_rope_prefix_is_refused_since_the_batch_decodes_at_1d_positions(examples):
    model, processor = build_case("qwen2_vl").model, vlm_processor("qwen2_vl")
    inputs, prefix = _prepared(model, processor, examples[0])
    assert prefix.generation_state  # Qwen2-VL keeps its images' position offset
    press = build_press(
        "snapkv", BUDGET, context_tokens=int(inputs["input_ids"].shape[1]), window_size=WINDOW
    )
    with pytest.raises(ValueError, match="M-RoPE"):
        run_mm_examples_together(model, processor, examples[0], [None, press], inputs=inputs, prefix=prefix)


def _grid(vlm, examples, out, **settings):
    methods = ["full", "snapkv", "mixkv-snapkv", "adakv", "mixkv-adakv"]
    run_mm_eval(
        vlm, {"synthetic_text_reading": examples}, methods=methods, budgets=[BUDGET], out_dir=out,
        window_size=WINDOW, max_new_tokens=4, seed=0, **settings,
    )  # fmt: skip
    cells = {}
    for method in methods:
        name = cell_filename(method, None if method == "full" else BUDGET, "synthetic_text_reading", None)
        cells[method] = json.loads((out / "cells" / name).read_text())
    return cells


def test_a_batched_grid_writes_the_answers_of_one_decoded_cell_by_cell(llava, examples, tmp_path):
    batched = _grid(llava, examples, tmp_path / "batched")
    alone = _grid(llava, examples, tmp_path / "alone", batch_decoding=False)
    for method, cell in batched.items():
        assert cell["config"]["batch_decoding"] is True
        assert alone[method]["config"]["batch_decoding"] is False
        assert [r["decode_batch"] for r in cell["examples"]] == [5, 5]
        assert all("decode_batch" not in r for r in alone[method]["examples"])
        for key in COMPARED:
            assert [r[key] for r in cell["examples"]] == [r[key] for r in alone[method]["examples"]], (
                method,
                key,
            )


def test_an_m_rope_grid_decodes_its_cells_one_by_one(examples, tmp_path):
    vlm = build_case("qwen2_vl").model, vlm_processor("qwen2_vl")
    cells = _grid(vlm, examples, tmp_path)
    assert all("decode_batch" not in r for cell in cells.values() for r in cell["examples"])
