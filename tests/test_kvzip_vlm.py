"""KVzip on an image prompt: the repeat reads the prompt again as the decoder read it, images included.

The reference is one eager forward over the prompt's decoder inputs followed by the repeat's (the
instruction's embeddings, then the prompt's own, image features in place): the most attention any
repeat row pays a prompt column, over the query heads of the column's KV group.
"""

import pytest
import torch
from transformers import DynamicCache

import mixkv
from mixkv.eval.mm_example_run import decoder_inputs
from mixkv.eval.mm_runner import run_mm_eval
from mixkv.eval.synthetic_images import make_synthetic_suite
from mixkv.integration.cache import DenseCompressedLayer
from tests.families import build_case, vlm_processor
from tests.helpers_tiny import scale_weight_matrices

torch.set_num_threads(1)

REPEAT = (5, 6, 7)
ANSWER = (8,)


def kvzip(budget, **options):
    return mixkv.KVzipPress(
        budget=budget, window_size=1, repeat_prompt_ids=REPEAT, answer_prefix_ids=ANSWER, **options
    )


@pytest.fixture(scope="module")
def llava():
    case = build_case("llava", attn_implementation="eager")
    # Weights 4x the default initialisation, so that the answers depend on what the cache kept.
    return scale_weight_matrices(case.model, 4), case.inputs


class ScoreCapture(mixkv.KVzipPress):
    """KVzipPress that keeps the reconstruction scores each layer was compressed with."""

    seen: dict

    def scores(self, ctx):
        self.seen[ctx.layer_idx] = ctx.reconstruction_scores.clone()
        return super().scores(ctx)


def test_image_prompt_scores_are_the_repeat_rows_attention_in_a_plain_forward_over_its_embeddings(llava):
    model, inputs = llava
    press = ScoreCapture(budget=8, window_size=1, repeat_prompt_ids=REPEAT, answer_prefix_ids=ANSWER)
    press.seen = {}
    with torch.no_grad(), press(model):
        model(**inputs, past_key_values=DynamicCache(config=model.config))

    prompt = decoder_inputs(model, inputs)
    n = prompt.shape[1]
    instruction = model.get_input_embeddings()(torch.tensor([[*REPEAT, *ANSWER]]))
    with torch.no_grad():
        out = model(inputs_embeds=torch.cat([prompt, instruction, prompt], dim=1), output_attentions=True)
    kv_heads = model.config.text_config.num_key_value_heads
    image = inputs["input_ids"][0] == model.config.image_token_id
    for layer, attention in enumerate(out.attentions):
        rows = attention[:, :, n:, :n]
        expected = rows.reshape(1, kv_heads, -1, rows.shape[2], n).amax(dim=(2, 3))
        torch.testing.assert_close(press.seen[layer], expected, rtol=1e-4, atol=1e-6)
        # The repeat reads the images again: their entries score as much as a text repeat's.
        assert float(press.seen[layer][..., image].max()) > 0.01


def test_image_prompt_at_a_budget_not_below_the_prompt_generates_as_without_press(llava):
    model, inputs = llava
    n = int(inputs["input_ids"].shape[1])
    press = kvzip(n)
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        with press(model):
            pressed = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert press.last_reconstruction_seconds is not None  # the repeat ran
    assert torch.equal(plain, pressed)


def test_image_prompt_cache_holds_the_budget_of_prompt_entries(llava):
    model, inputs = llava
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kvzip(8)(model):
        model(**inputs, past_key_values=cache)
    assert all(isinstance(layer, DenseCompressedLayer) for layer in cache.layers)
    assert all(layer.keys.shape[2] == 8 for layer in cache.layers)


def test_same_ids_with_other_images_reconstruct_again(llava):
    model, inputs = llava
    other = {**inputs, "pixel_values": torch.flip(inputs["pixel_values"], dims=[-1])}
    memo = {}
    press = kvzip(8, reconstruction_memo=memo)
    with torch.no_grad(), press(model):
        model(**inputs, past_key_values=DynamicCache(config=model.config))
        model(**other, past_key_values=DynamicCache(config=model.config))
        assert not press.last_reconstruction_reused
        model(**inputs, past_key_values=DynamicCache(config=model.config))
        assert press.last_reconstruction_reused
    assert len(memo) == 2


def _continued(model, inputs, press, embeddings, tail=4):
    """The prompt's cache when its last ``tail`` tokens continue a full-cache prefix under ``press``."""
    ids = inputs["input_ids"]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(inputs_embeds=decoder_inputs(model, inputs)[:, :-tail], past_key_values=cache)
        with press(model) as session:
            session.declare_prompt(cache, ids, embeddings)
            model(input_ids=ids[:, -tail:], past_key_values=cache)
    return cache


def test_image_prompt_continuing_a_prefix_with_its_embeddings_keeps_what_a_one_go_prefill_keeps(llava):
    model, inputs = llava
    one_go = DynamicCache(config=model.config)
    with torch.no_grad(), kvzip(8)(model):
        model(**inputs, past_key_values=one_go)
    continued = _continued(model, inputs, kvzip(8), decoder_inputs(model, inputs))
    for a, b in zip(one_go.layers, continued.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-5)


def test_image_prompt_continuing_a_prefix_without_its_embeddings_is_refused(llava):
    model, inputs = llava
    with pytest.raises(ValueError, match="declare the prompt with its embeddings"):
        _continued(model, inputs, kvzip(8), None)


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_image_prompts_read_at_m_rope_positions_or_with_per_token_attention_are_refused_by_name(family):
    case = build_case(family)
    with torch.no_grad(), kvzip(8)(case.model), pytest.raises(ValueError, match="M-RoPE or per-token"):
        case.model(**case.inputs, past_key_values=DynamicCache(config=case.model.config))


@pytest.mark.parametrize("family", ["llava_next", "internvl", "idefics3"])
def test_other_1d_vlm_families_generate_as_without_press_at_a_budget_not_below_the_prompt(family):
    case = build_case(family)
    n = int(case.inputs["input_ids"].shape[1])
    press = kvzip(n)
    with torch.no_grad():
        plain = case.model.generate(**case.inputs, max_new_tokens=4, do_sample=False)
        with press(case.model):
            pressed = case.model.generate(**case.inputs, max_new_tokens=4, do_sample=False)
    assert press.last_reconstruction_seconds is not None  # the repeat ran
    assert torch.equal(plain, pressed)


def _kvzip_cells(model, examples, out_dir, share_prefill=True, methods=("kvzip",)):
    result = run_mm_eval(
        (model, vlm_processor("llava")),
        {"text_reading": examples},
        methods=["full", *methods],
        budgets=[16, 24],
        window_size=4,
        share_prefill=share_prefill,
        out_dir=out_dir,
    )
    return {
        (c["cell"]["method"], c["cell"]["budget"]): c for c in result.cells if c["cell"]["method"] != "full"
    }


def test_multimodal_grid_runs_kvzip_and_mixkv_on_it_reconstructing_each_example_once(
    llava, tmp_path, monkeypatch
):
    from mixkv.integration.session import PressSession

    model, _ = llava
    examples = make_synthetic_suite("text_reading", 2, 0, tmp_path / "images")
    reconstructed = []
    real = PressSession._reconstruct

    def counted(self, press, cache, ids, embeddings):
        reconstructed.append(embeddings is not None)
        scores, _ = real(self, press, cache, ids, embeddings)
        return scores, 100.0  # so that a cell reusing the scores shows it counts their time

    monkeypatch.setattr(PressSession, "_reconstruct", counted)
    shared = _kvzip_cells(model, examples, tmp_path / "shared", methods=("kvzip", "mixkv-kvzip-global"))
    assert reconstructed == [True, True]  # 2 examples, 2 methods x 2 budgets each
    for (_, budget), cell in shared.items():
        assert cell["kept_tokens_mean"] == float(budget)
        for record in cell["examples"]:
            assert record["kv_bytes"] < record["kv_bytes_full"]
            assert record["shared_prefix_tokens"] > 0
    assert all(r["prefill_seconds"] >= 100.0 for r in shared["kvzip", 24]["examples"])  # the reused scores'
    one_go = _kvzip_cells(model, examples, tmp_path / "one_go", share_prefill=False)
    assert reconstructed == [True] * 4
    for (_, budget), cell in one_go.items():
        assert all(r["shared_prefix_tokens"] == 0 for r in cell["examples"])
        for key in ("output", "kv_bytes", "kept_tokens_mean", "image_tokens_kept"):
            assert [r[key] for r in cell["examples"]] == [r[key] for r in shared["kvzip", budget]["examples"]]


def test_repeat_chunks_say_where_they_copy_the_context_overlap_included():
    context = torch.arange(100, 150).reshape(1, -1)
    chunks = kvzip(8, chunk_size=20, overlap=3, continue_prompt_ids=(9, 9)).repeat_chunks(context)
    assert [(c.start, c.end) for c in chunks] == [(0, 20), (20, 40), (40, 50)]
    assert [len(c.copies) for c in chunks] == [1, 2, 2]
    for chunk in chunks:
        copied = [int(i) for row, first, last in chunk.copies for i in chunk.ids[0, row : row + last - first]]
        assert copied == [i for _, first, last in chunk.copies for i in range(100 + first, 100 + last)]
    assert chunks[1].copies[0][1:] == (17, 20)  # the previous chunk's last 3 ids
