"""Compress once, ask many (`mixkv.CompressedContext`), on tiny random LLMs and VLMs."""

import functools
import random

import pytest
import torch
from transformers import DynamicCache

import mixkv
from mixkv import CompressedContext
from mixkv.integration import chat_prompt_parts
from mixkv.presses import from_name
from tests.families import FIRST_WORD_ID, VOCAB_SIZE, build_case
from tests.helpers_tiny import SIMPLE_CHAT_TEMPLATE, tiny_llama, word_tokenizer

FAMILIES = ("llama", "gemma3_text", "qwen2_vl", "llava", "gemma3")
WINDOW = 8
NEW_TOKENS = 4


@functools.cache
def cached_case(family):
    return build_case(family)


def questions(n=3, length=6, seed=0):
    rng = random.Random(seed)
    return [torch.tensor([rng.randrange(FIRST_WORD_ID, VOCAB_SIZE) for _ in range(length)]) for _ in range(n)]


def answers(case, press, qs):
    with CompressedContext(case.model, press, case.inputs) as ctx:
        return [ctx.generate(q, max_new_tokens=NEW_TOKENS).tolist() for q in qs]


def whole_prompt(case, question):
    """The case's inputs with the question appended, as one prompt for `model.generate`."""
    inputs = dict(case.inputs)
    q = question[None]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], q], 1)
    for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            fill = torch.ones_like(q) if key == "attention_mask" else torch.zeros_like(q)
            inputs[key] = torch.cat([inputs[key], fill.to(inputs[key].dtype)], 1)
    return inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_each_answer_equals_a_fresh_compression_then_that_question(family):
    case = cached_case(family)
    press = from_name("mixkv-adakv", budget=case.prompt_len // 3, window_size=WINDOW)
    qs = questions()
    shared = answers(case, press, qs)
    assert press.last_report is not None and press.last_report.compressed_layers
    fresh = [answers(case, press, [q])[0] for q in qs]
    assert shared == fresh


@pytest.mark.parametrize("family", FAMILIES)
def test_full_cache_answer_equals_generate_on_the_whole_prompt(family):
    case = cached_case(family)
    q = questions(1)[0]
    out = case.model.generate(**whole_prompt(case, q), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert answers(case, None, [q])[0] == out[0, case.prompt_len + len(q) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_not_below_context_equals_the_full_cache(family):
    case = cached_case(family)
    qs = questions(2)
    press = from_name("snapkv", budget=case.prompt_len, window_size=WINDOW)
    assert answers(case, press, qs) == answers(case, None, qs)


def test_answers_do_not_depend_on_earlier_questions():
    case = cached_case("qwen2_vl")
    press = from_name("mixkv-snapkv", budget=case.prompt_len // 3, window_size=WINDOW)
    q1, q2 = questions(2)
    assert answers(case, press, [q1, q2, q1])[2] == answers(case, press, [q1])[0]


def test_chat_prompt_parts_rebuild_the_chat_prompt():
    tok = word_tokenizer(SIMPLE_CHAT_TEMPLATE)
    head, suffix = chat_prompt_parts(tok, "The sky is blue .")
    full = tok.apply_chat_template(
        [{"role": "user", "content": "The sky is blue .\n\nWhat is blue ?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert head + "What is blue ?" + suffix == full


def test_ask_decodes_the_answer_to_a_text_question():
    tok = word_tokenizer(SIMPLE_CHAT_TEMPLATE)
    model = tiny_llama(len(tok))
    context = " ".join(["The grass is green . The sky is blue ."] * 12)
    press = from_name("snapkv", budget=24, window_size=WINDOW)
    with CompressedContext.from_chat(model, tok, press, context) as ctx:
        text = ctx.ask("What is blue ?", max_new_tokens=NEW_TOKENS)
        ids = tok("What is blue ?" + ctx.question_suffix, add_special_tokens=False)["input_ids"]
        expected = tok.decode(ctx.generate(ids, max_new_tokens=NEW_TOKENS), skip_special_tokens=True)
    assert text == expected.strip()
    assert press.last_report.compressed_layers


def test_compressed_cache_is_refused_after_the_block():
    case = cached_case("llama")
    press = from_name("snapkv", budget=case.prompt_len // 3, window_size=WINDOW)
    with CompressedContext(case.model, press, case.inputs) as ctx:
        pass
    with pytest.raises(RuntimeError, match="inside `with"):
        ctx.generate(questions(1)[0])


def test_a_batch_is_refused():
    case = build_case("llama", batch_size=2)
    with pytest.raises(ValueError, match=r"\(1, N\)"):
        CompressedContext(case.model, None, case.inputs)


def test_a_foreign_press_is_refused():
    with pytest.raises(ValueError, match="mixkv press"):
        CompressedContext(cached_case("llama").model, object(), torch.ones(1, 4, dtype=torch.long))


def test_ask_without_a_processor_is_refused():
    case = cached_case("llama")
    with (
        CompressedContext(case.model, None, case.inputs) as ctx,
        pytest.raises(ValueError, match="processor"),
    ):
        ctx.ask("anything")


def test_fork_of_a_cache_the_session_did_not_prefill_is_refused():
    case = cached_case("llama")
    with mixkv.SnapKVPress(budget=64)(case.model) as session, pytest.raises(ValueError, match="prefilled"):
        session.fork(DynamicCache(config=case.model.config))


def test_ask_with_an_answer_prefix_continues_it():
    tok = word_tokenizer(SIMPLE_CHAT_TEMPLATE)
    model = tiny_llama(len(tok))
    context = " ".join(["The grass is green . The sky is blue ."] * 12)
    prefix = "The sky is"
    with CompressedContext.from_chat(model, tok, None, context) as ctx:
        text = ctx.ask("What is blue ?", max_new_tokens=NEW_TOKENS, answer_prefix=prefix)
        without = ctx.ask("What is blue ?", max_new_tokens=NEW_TOKENS)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": f"{context}\n\nWhat is blue ?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(prompt + prefix, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert text == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert text != without
