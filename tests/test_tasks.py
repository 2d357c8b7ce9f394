"""Tests of the RULER-style task generators (offline tokenizers built in the tests)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from mixkv.eval.haystack import count_tokens
from mixkv.eval.tasks import TASKS, make_examples
from mixkv.eval.text_example import encode_prompt, score_output
from tests.helpers_tiny import SIMPLE_CHAT_TEMPLATE, bpe_tokenizer, word_tokenizer

NIAH_TASKS = [t for t in TASKS if t.startswith("niah")]


@pytest.fixture(scope="module")
def bpe():
    return bpe_tokenizer()


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_gives_identical_examples(task, bpe):
    a = make_examples(task, bpe, 512, 2, seed=3)
    b = make_examples(task, bpe, 512, 2, seed=3)
    assert a == b


def test_different_seeds_give_different_examples(bpe):
    a = make_examples("niah_single_2", bpe, 512, 1, seed=0)[0]
    b = make_examples("niah_single_2", bpe, 512, 1, seed=1)[0]
    assert a.context != b.context and a.answers != b.answers


def test_examples_within_one_call_differ(bpe):
    a, b = make_examples("niah_single_1", bpe, 512, 2, seed=0)
    assert a.answers != b.answers


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [512, 1500])
def test_context_length_is_within_five_percent(task, length, bpe):
    for ex in make_examples(task, bpe, length, 2, seed=0):
        n = count_tokens(bpe, ex.context)
        assert n == ex.context_tokens
        assert abs(n - length) <= 0.05 * length


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_2", "vt", "qa"])
def test_context_length_is_within_five_percent_for_word_tokenizer(task):
    tok = word_tokenizer()
    ex = make_examples(task, tok, 400, 1, seed=0)[0]
    assert abs(count_tokens(tok, ex.context) - 400) <= 20


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_needles_are_inside_the_context(task, bpe):
    for ex in make_examples(task, bpe, 800, 2, seed=1):
        for needle in ex.metadata["needles"]:
            assert needle in ex.context
        for answer in ex.answers:
            assert answer in ex.context


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_asked_value_appears_only_in_its_needle(task, bpe):
    ex = make_examples(task, bpe, 800, 1, seed=2)[0]
    for answer in ex.answers:
        assert ex.context.count(answer) == 1


def test_single_needle_question_names_the_key_of_the_needle(bpe):
    ex = make_examples("niah_single_2", bpe, 600, 1, seed=0)[0]
    key = ex.metadata["asked"][0]
    assert key in ex.question
    assert f"for {key} is: {ex.answers[0]}." in ex.context


def test_noise_haystack_is_the_repeated_noise(bpe):
    ex = make_examples("niah_single_1", bpe, 400, 1, seed=0)[0]
    assert "The grass is green. The sky is blue." in ex.context


def test_docstring_haystack_is_natural_language(bpe):
    ex = make_examples("niah_single_2", bpe, 400, 1, seed=0)[0]
    assert "The grass is green" not in ex.context
    assert len(set(ex.context.split())) > 100


@pytest.mark.parametrize("task", TASKS)
def test_expected_answers_score_one_under_their_metric(task, bpe):
    ex = make_examples(task, bpe, 600, 1, seed=0)[0]
    assert ex.metric in ("all", "part", "word")
    assert score_output(" ; ".join(ex.answers), ex.answers, ex.metric) == 1.0
    assert score_output("nothing relevant", ex.answers, ex.metric) == 0.0


def test_all_metric_is_recall_of_expected_strings():
    assert score_output("Alpha and GAMMA", ["alpha", "beta", "gamma", "delta"], "all") == 0.5


def test_part_metric_needs_one_expected_string():
    assert score_output("it was Moreau", ["Idris Moreau", "Moreau"], "part") == 1.0


def test_unknown_metric_raises():
    with pytest.raises(ValueError, match="'all', 'part' or 'word'"):
        score_output("x", ["x"], "exact")


def test_vt_chain_statements_appear_in_order(bpe):
    ex = make_examples("vt", bpe, 800, 1, seed=0)[0]
    positions = [ex.context.index(s) for s in ex.metadata["statements"]]
    assert positions == sorted(positions)
    assert ex.metadata["statements"][0].endswith(f"= {ex.metadata['value']}.")
    assert len(ex.answers) == 5


def test_cwe_expected_words_are_the_most_common(bpe):
    ex = make_examples("cwe", bpe, 1500, 1, seed=0)[0]
    counts = Counter(re.findall(r"\d+\. (\w+)", ex.context))
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(ex.answers)
    assert min(counts[w] for w in ex.answers) > max(c for w, c in counts.items() if w not in ex.answers)


def test_fwe_expected_words_are_the_three_most_frequent(bpe):
    ex = make_examples("fwe", bpe, 1000, 1, seed=0)[0]
    counts = Counter(ex.context.split("\n", 1)[1].split())
    ranked = [w for w, _ in counts.most_common() if w != "..."]
    assert ranked[:3] == ex.answers
    assert counts[ex.answers[2]] > counts[ranked[3]]


def test_qa_answer_document_is_in_the_context(bpe):
    ex = make_examples("qa", bpe, 1000, 1, seed=4)[0]
    assert ex.metric == "part"
    assert ex.metadata["document"] in ex.context
    assert any(a in ex.metadata["document"] for a in ex.answers)


def test_unknown_task_raises_listing_the_tasks(bpe):
    with pytest.raises(ValueError, match="niah_single_1") as info:
        make_examples("needle", bpe, 512, 1)
    assert "qa" in str(info.value)


def test_too_short_context_raises_with_a_minimum(bpe):
    with pytest.raises(ValueError, match="at least"):
        make_examples("niah_multiquery", bpe, 40, 1)


def test_non_positive_n_raises(bpe):
    with pytest.raises(ValueError, match="positive"):
        make_examples("qa", bpe, 512, 0)


def test_prompt_with_chat_template_splits_right_before_the_question():
    tok = word_tokenizer(SIMPLE_CHAT_TEMPLATE)
    ex = make_examples("niah_single_1", tok, 300, 1, seed=0)[0]
    context_ids, question_ids = encode_prompt(ex, tok)
    head, tail = tok.decode(context_ids), tok.decode(question_ids)
    assert len(context_ids) > ex.context_tokens  # the template's user-turn header comes first
    assert "What is the special magic number" in tail
    assert "What is the special magic number" not in head
    assert tail.rstrip().endswith("text is")


def test_prompt_without_chat_template_ends_with_answer_prefix():
    tok = word_tokenizer()
    ex = make_examples("niah_single_1", tok, 300, 1, seed=0)[0]
    context_ids, question_ids = encode_prompt(ex, tok)
    assert len(context_ids) >= ex.context_tokens
    assert tok.decode(question_ids).rstrip().endswith("text is")


def test_forcing_a_missing_chat_template_raises():
    tok = word_tokenizer()
    ex = make_examples("niah_single_1", tok, 300, 1, seed=0)[0]
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(ex, tok, use_chat_template=True)


def test_word_metric_needs_a_whole_word():
    assert score_output("she came 3 times", ["3"], "word") == 1.0
    assert score_output("she came 13 times", ["3"], "word") == 0.0


def test_agg_list_names_every_fruit_once_and_only_fruits_are_expected(bpe):
    for ex in make_examples("agg_list", bpe, 1500, 2, seed=0):
        for fruit in ex.metadata["fruits"]:
            assert ex.context.count(f"a crate of {fruit} was delivered") == 1
        assert set(ex.answers) == set(ex.metadata["fruits"]) and len(ex.answers) == 4


def test_agg_count_answer_is_the_number_of_visits_in_the_context(bpe):
    for ex in make_examples("agg_count", bpe, 1500, 3, seed=0):
        asked = ex.metadata["people"][0]
        visits = ex.context.count(f"Visitor book: {asked} came to the archive.")
        assert ex.answers[0] == str(visits) and asked in ex.question


def test_multihop_answer_needs_both_hops_which_are_in_the_context(bpe):
    for ex in make_examples("multihop", bpe, 1500, 2, seed=0):
        key, locker, number = ex.metadata["keys"][0], ex.metadata["lockers"][0], ex.metadata["numbers"][0]
        assert f"The code for the {key} vault is kept in locker {locker}." in ex.context
        assert f"Locker {locker} holds the number {number}." in ex.context
        assert number not in ex.question and str(locker) not in ex.question
        assert ex.answers == [number]


def test_multihop_has_one_distractor_chain_in_the_same_wording(bpe):
    for ex in make_examples("multihop", bpe, 1500, 3, seed=0):
        distractor_key, distractor_locker = ex.metadata["keys"][1], ex.metadata["lockers"][1]
        assert len(ex.metadata["keys"]) == 2 and distractor_key not in ex.question
        assert f"The code for the {distractor_key} vault is kept in locker {distractor_locker}." in ex.context
        assert f"Locker {distractor_locker} holds the number {ex.metadata['numbers'][1]}." in ex.context


def test_source_default_asks_a_default_written_in_the_one_definition_of_its_function(bpe):
    for ex in make_examples("source_default", bpe, 1500, 3, seed=0):
        function, parameter = ex.metadata["function"], ex.metadata["parameter"]
        assert ex.context.count(f"def {function}(") == 1
        assert re.search(rf"\b{parameter}\s*(:[^=,]+)?=\s*{re.escape(ex.answers[0])}", ex.context)
        assert ex.answers[0] not in ("None", "True", "False", "0", "1")


def test_source_raises_message_appears_once_inside_the_asked_function(bpe):
    from mixkv.eval.source_tasks import source_functions

    sources = {f.name: f.source for f in source_functions()}
    for ex in make_examples("source_raises", bpe, 1500, 3, seed=0):
        message = ex.metadata["message"]
        assert ex.context.count(message) == 1
        assert message in sources[ex.answers[0]] and ex.answers[0] not in ex.question


def test_example_digest_changes_with_the_question_not_only_the_context(bpe):
    from dataclasses import replace

    example = make_examples("multihop", bpe, 600, 1, seed=0)[0]
    assert replace(example, question=example.question + "?").digest != example.digest
    assert replace(example).digest == example.digest
