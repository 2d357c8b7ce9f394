"""Conversations rendered by chat templates that disagree on the form of a text-only turn
(`mixkv.integration.chat_prompts.render_chat`)."""

import pytest

from mixkv.integration.chat_prompts import render_chat
from tests.helpers_tiny import SIMPLE_CHAT_TEMPLATE, word_tokenizer

# Concatenates the system turn's content as a string (as Qwen's and the tiny VLM's templates do):
# a list of text parts fails with "can only concatenate str (not "list") to str".
STRING_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '\n' }}"
    "{% else %}<|{{ m['role'] }}|>\n{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Reads only the text parts of every turn (as LLaVA's templates do): a string content is dropped.
PARTS_ONLY_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Ignores system turns.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}<|{{ m['role'] }}|>\n"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
USER = {"role": "user", "content": [{"type": "text", "text": "What is blue ?"}]}


def test_a_system_turn_is_given_as_a_string_to_a_template_that_concatenates_it():
    tok = word_tokenizer(STRING_SYSTEM_TEMPLATE)
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief ."}]}
    with pytest.raises(TypeError, match="concatenate"):
        tok.apply_chat_template([system, USER], add_generation_prompt=True, tokenize=False)
    as_string = [{"role": "system", "content": "Be brief ."}, USER]
    expected = tok.apply_chat_template(as_string, add_generation_prompt=True, tokenize=False)
    assert expected.startswith("<|system|>\nBe brief .")
    for content in ("Be brief .", system["content"]):
        assert render_chat(tok, [{"role": "system", "content": content}, USER]) == expected


def test_a_system_turn_is_given_as_parts_to_a_template_that_reads_only_parts():
    tok = word_tokenizer(PARTS_ONLY_TEMPLATE)
    as_parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief ."}]}, USER]
    expected = tok.apply_chat_template(as_parts, add_generation_prompt=True, tokenize=False)
    assert "Be brief ." in expected
    assert render_chat(tok, [{"role": "system", "content": "Be brief ."}, USER]) == expected


def test_a_template_that_drops_the_system_prompt_is_refused():
    tok = word_tokenizer(NO_SYSTEM_TEMPLATE)
    with pytest.raises(ValueError, match="drops the system prompt"):
        render_chat(tok, [{"role": "system", "content": "Be brief ."}, USER])


def test_without_a_system_turn_the_conversation_renders_as_given_and_the_prefix_follows():
    tok = word_tokenizer(STRING_SYSTEM_TEMPLATE)
    expected = tok.apply_chat_template([USER], add_generation_prompt=True, tokenize=False)
    assert render_chat(tok, [USER]) == expected
    assert render_chat(tok, [USER], answer_prefix="The sky is") == expected + "The sky is"


def test_text_only_turns_become_strings_for_a_string_only_template():
    tok = word_tokenizer(SIMPLE_CHAT_TEMPLATE)  # prints the content as it is
    assert render_chat(tok, [{"role": "user", "content": "What is blue ?"}]) == (
        "<|user|>\nWhat is blue ?\n<|assistant|>\n"
    )
