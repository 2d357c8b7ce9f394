"""Tests of mixkv.eval.mm_metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest

from mixkv.eval.mm_metrics import (
    CiderD,
    anls,
    caption_tokenize,
    cider_d,
    cider_d_scores,
    levenshtein_distance,
    mean_anls,
    mean_relaxed_accuracy,
    mean_vqa_accuracy,
    normalize_vqa_answer,
    ocrbench_correct,
    ocrbench_score,
    parse_point,
    point_in_box,
    relaxed_accuracy,
    screenspot_accuracy,
    screenspot_correct,
    vqa_accuracy,
)

# ------------------------------------------------------------------------------------ ANLS


def test_levenshtein_counts_substitution_insertion_deletion() -> None:
    # kitten -> sitten (sub k/s) -> sittin (sub e/i) -> sitting (insert g) = 3
    assert levenshtein_distance("kitten", "sitting") == 3


def test_anls_one_substitution() -> None:
    # lev("hello", "hallo") = 1, max len 5 -> NL = 0.2 -> 1 - 0.2 = 0.8
    assert anls("hello", ["hallo"]) == pytest.approx(0.8)


def test_anls_ignores_case_and_surrounding_whitespace() -> None:
    # " HELLO " -> "hello" == "hello" -> NL = 0 -> 1.0
    assert anls(" HELLO ", ["hello"]) == 1.0


def test_anls_zero_at_threshold() -> None:
    # lev("ab", "ac") = 1, max len 2 -> NL = 0.5 >= tau = 0.5 -> 0
    assert anls("ab", ["ac"]) == 0.0


def test_anls_just_below_threshold() -> None:
    # lev("abc", "abd") = 1, max len 3 -> NL = 1/3 < 0.5 -> 1 - 1/3 = 2/3
    assert anls("abc", ["abd"]) == pytest.approx(2 / 3)


def test_anls_takes_best_reference() -> None:
    # vs "xyz": NL = 1 -> 0; vs "hallo": 0.8; vs "hello": 1.0 -> max = 1.0
    assert anls("hello", ["xyz", "hallo", "hello"]) == 1.0


def test_anls_empty_prediction_scores_zero() -> None:
    # lev("", "abc") = 3, max len 3 -> NL = 1 -> 0
    assert anls("", ["abc"]) == 0.0


def test_anls_empty_answers_raise() -> None:
    with pytest.raises(ValueError, match="answers"):
        anls("x", [])


def test_mean_anls_averages_questions() -> None:
    # (0.8 + 1.0 + 0.0) / 3 = 0.6
    assert mean_anls(["hello", "a", ""], [["hallo"], ["A"], ["abc"]]) == pytest.approx(0.6)


def test_mean_anls_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="one reference entry per prediction"):
        mean_anls(["a", "b"], [["a"]])


# ------------------------------------------------------------------------------ VQA accuracy


def test_vqa_normalization_number_words_and_punctuation() -> None:
    # "Two dogs!" -> "!" becomes a space -> lower -> "two" -> "2" -> "2 dogs"
    assert normalize_vqa_answer("Two dogs!") == "2 dogs"


def test_vqa_normalization_drops_articles_and_periods() -> None:
    # "The cat." -> period not before a digit removed -> "the" dropped -> "cat"
    assert normalize_vqa_answer("The cat.") == "cat"


def test_vqa_normalization_restores_contractions() -> None:
    assert normalize_vqa_answer("dont") == "don't"


def test_vqa_normalization_thousands_and_decimals() -> None:
    # digit,digit present -> commas deleted: "1,000" -> "1000"; "3.5" keeps its decimal point
    assert normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("3.5") == "3.5"


def test_vqa_normalization_inner_hyphen_becomes_space() -> None:
    # "-" touches no space and no digit,digit -> replaced by a space
    assert normalize_vqa_answer("well-known") == "well known"


def test_vqa_accuracy_three_matches() -> None:
    # 3 of 10 humans said "nokia". Leave out one of those 3: 2 matches -> 2/3 (x3 subsets);
    # leave out one of the other 7: 3 matches -> 1 (x7). (3 * 2/3 + 7 * 1) / 10 = 0.9
    answers = ["nokia"] * 3 + ["samsung"] * 7
    assert vqa_accuracy("nokia", answers) == pytest.approx(0.9)


def test_vqa_accuracy_one_match() -> None:
    # Leaving out the match: 0 -> 0; leaving out any of the 9 others: 1/3. 9 * (1/3) / 10 = 0.3
    answers = ["nokia"] + ["samsung"] * 9
    assert vqa_accuracy("nokia", answers) == pytest.approx(0.3)


def test_vqa_accuracy_four_matches_is_full() -> None:
    # Every leave-one-out subset keeps >= 3 matches -> min(1, >=3/3) = 1
    assert vqa_accuracy("nokia", ["nokia"] * 4 + ["lg"] * 6) == 1.0


def test_vqa_accuracy_no_match_is_zero() -> None:
    assert vqa_accuracy("apple", ["nokia"] * 10) == 0.0


def test_vqa_accuracy_matches_after_normalization() -> None:
    # "Two." -> "2" matches all 10 "2": 9 matches per subset -> 1
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0


def test_vqa_accuracy_single_reference_is_exact_match() -> None:
    assert vqa_accuracy("the stop", ["Stop"]) == 1.0
    assert vqa_accuracy("go", ["Stop"]) == 0.0


def test_mean_vqa_accuracy_averages_questions() -> None:
    # (0.9 + 0.0) / 2 = 0.45
    answers = [["nokia"] * 3 + ["samsung"] * 7, ["x"] * 10]
    assert mean_vqa_accuracy(["nokia", "y"], answers) == pytest.approx(0.45)


# ------------------------------------------------------------------------ relaxed accuracy


def test_relaxed_accuracy_within_five_percent() -> None:
    # |104 - 100| / 100 = 0.04 <= 0.05 -> correct
    assert relaxed_accuracy("104", ["100"]) == 1.0


def test_relaxed_accuracy_outside_five_percent() -> None:
    # |106 - 100| / 100 = 0.06 > 0.05 -> wrong
    assert relaxed_accuracy("106", ["100"]) == 0.0


def test_relaxed_accuracy_boundary_and_thousands_separator() -> None:
    # "1,050" -> 1050; |1050 - 1000| / 1000 = 0.05 <= 0.05 -> correct
    assert relaxed_accuracy("1,050", ["1000"]) == 1.0


def test_relaxed_accuracy_percent_sign_not_rescaled() -> None:
    # "45%" -> 45 and "45" -> 45 -> relative change 0
    assert relaxed_accuracy("45%", ["45"]) == 1.0


def test_relaxed_accuracy_currency_sign_ignored() -> None:
    assert relaxed_accuracy("$12", ["12"]) == 1.0


def test_relaxed_accuracy_text_exact_match_case_insensitive() -> None:
    assert relaxed_accuracy(" Yes", ["yes "]) == 1.0
    assert relaxed_accuracy("no", ["yes"]) == 0.0


def test_relaxed_accuracy_zero_target_needs_exact_zero() -> None:
    # relative change undefined for 0 -> only 0 is accepted
    assert relaxed_accuracy("0", ["0"]) == 1.0
    assert relaxed_accuracy("0.01", ["0"]) == 0.0


def test_relaxed_accuracy_empty_prediction_is_wrong() -> None:
    assert relaxed_accuracy("", ["5"]) == 0.0


def test_mean_relaxed_accuracy_averages_questions() -> None:
    # correct, wrong, correct, correct -> 3 / 4 = 0.75
    assert mean_relaxed_accuracy(["104", "106", "yes", "0"], ["100", "100", "Yes", "0"]) == 0.75


# ------------------------------------------------------------------------------- OCRBench


def test_ocrbench_answer_substring_of_prediction() -> None:
    # "private" in "the word is private." -> correct
    assert ocrbench_correct("The word is PRIVATE.", ["private"])


def test_ocrbench_partial_prediction_is_wrong() -> None:
    assert not ocrbench_correct("priv", ["private"])


def test_ocrbench_accepts_string_answer() -> None:
    assert ocrbench_correct("it says hello", "Hello")


def test_ocrbench_handwritten_math_removes_spaces() -> None:
    # "\frac { a } { b }" -> "\frac{a}{b}" contains the answer
    assert ocrbench_correct("\\frac { a } { b }", ["\\frac{a}{b}"], category="HME100k")


def test_ocrbench_spaces_matter_outside_handwritten_math() -> None:
    assert not ocrbench_correct("\\frac { a } { b }", ["\\frac{a}{b}"])


def test_ocrbench_handwritten_math_is_case_sensitive() -> None:
    assert not ocrbench_correct("X^2", ["x^2"], category="Handwritten Mathematical Expression Recognition")


def test_ocrbench_score_counts_correct() -> None:
    # correct, wrong, correct -> score 2, accuracy 2/3
    result = ocrbench_score(
        ["a cat", "dog", "x^{2}"], [["cat"], ["bird"], "x ^ { 2 }"], ["A", "A", "HME100k"]
    )
    assert result.correct == 2
    assert result.total == 3
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.per_category == {"A": (1, 2), "HME100k": (1, 1)}


# -------------------------------------------------------------------------------- CIDEr-D

_LN2 = math.log(2.0)


def test_caption_tokenize_lowercases_and_drops_punctuation() -> None:
    assert caption_tokenize("A Cat, sitting!") == ["a", "cat", "sitting"]


def test_caption_tokenize_keeps_inner_hyphen_and_apostrophe() -> None:
    assert caption_tokenize("well-known don't 3.5") == ["well-known", "don't", "3.5"]


def test_cider_d_identical_unigram_caption() -> None:
    # Corpus of N = 2 images: refs ["cat"], ["dog"]; weight of each word = ln 2 - ln 1 = ln 2.
    # Image 1, "cat" vs "cat": n=1 cosine = ln2*ln2 / (ln2*ln2) = 1; n=2..4 have no n-grams -> 0;
    # equal lengths -> penalty 1. Score = 10 * mean(1, 0, 0, 0) = 2.5.
    # Image 2, "cat" vs "dog": no common n-gram -> 0. Corpus mean = 1.25.
    assert cider_d_scores(["cat", "cat"], [["cat"], ["dog"]]) == pytest.approx([2.5, 0.0])
    assert cider_d(["cat", "cat"], [["cat"], ["dog"]]) == pytest.approx(1.25)


def test_cider_d_length_penalty() -> None:
    # Corpus refs ["red cat"], ["dog"]; every n-gram has df = 1 -> weight ln 2 (L).
    # "cat" vs "red cat": candidate unigram vector {cat: L} (norm L), reference {red: L, cat: L}
    # (norm L*sqrt 2) -> cosine = L*L / (L * L*sqrt 2) = 1/sqrt 2. The candidate has no bigram
    # -> n=2 term 0. Lengths 1 vs 2 -> penalty exp(-1 / (2 * 6^2)) = exp(-1/72).
    # Score = 10 * (1/sqrt 2 * exp(-1/72)) / 4.
    expected = 10 * (1 / math.sqrt(2) * math.exp(-1 / 72)) / 4
    assert CiderD([["red cat"], ["dog"]]).score("cat", ["red cat"]) == pytest.approx(expected)


def test_cider_d_clips_repeated_candidate_ngrams() -> None:
    # Corpus refs ["cat"], ["dog"]. Candidate "cat cat": unigram {cat: 2L} (norm 2L), reference
    # {cat: L}. Clipped dot = min(2L, L) * L = L^2 -> cosine L^2 / (2L * L) = 0.5.
    # The candidate bigram (cat, cat) is not in the reference -> 0. Lengths 2 vs 1 -> exp(-1/72).
    # Score = 10 * 0.5 * exp(-1/72) / 4 = 1.25 * exp(-1/72).
    assert CiderD([["cat"], ["dog"]]).score("cat cat", ["cat"]) == pytest.approx(1.25 * math.exp(-1 / 72))


def test_cider_d_averages_over_references() -> None:
    # Corpus refs ["cat", "dog"], ["bird"]; "cat": similarity 1 (n=1) vs "cat", 0 vs "dog".
    # Score = 10 * mean_n(sum_refs) / 2 refs = 10 * (1/4) / 2 = 1.25.
    assert CiderD([["cat", "dog"], ["bird"]]).score("cat", ["cat", "dog"]) == pytest.approx(1.25)


def test_cider_d_ignores_case_and_punctuation() -> None:
    assert CiderD([["cat"], ["dog"]]).score("Cat.", ["cat"]) == pytest.approx(2.5)


def test_cider_d_single_image_corpus_scores_zero() -> None:
    # N = 1 -> ln N = 0 and every weight is 0 - ln(1) = 0
    assert cider_d(["a cat"], [["a cat"]]) == 0.0


def test_cider_d_bigram_match_adds_second_order() -> None:
    # Corpus refs ["red cat"], ["dog"]; candidate "red cat" equals the reference: n=1 and n=2
    # cosines are 1, n=3,4 empty -> 10 * (1 + 1) / 4 = 5.0
    assert CiderD([["red cat"], ["dog"]]).score("red cat", ["red cat"]) == pytest.approx(5.0)


def test_cider_d_empty_prediction_scores_zero() -> None:
    assert CiderD([["cat"], ["dog"]]).score("", ["cat"]) == 0.0


def test_cider_d_ln2_weight_sanity() -> None:
    # Document frequency of "cat" is 1 image of 2 -> idf = ln 2
    scorer = CiderD([["cat"], ["dog"]])
    assert scorer.log_num_images == pytest.approx(_LN2)
    assert scorer.document_frequency[("cat",)] == 1


# ---------------------------------------------------------------------------- point in box


def test_parse_point_parenthesised_pixels() -> None:
    assert parse_point("Click at (100, 200).") == (100.0, 200.0)


def test_parse_point_square_brackets() -> None:
    assert parse_point("[12.5, 7]") == (12.5, 7.0)


def test_parse_point_box_gives_centre() -> None:
    # centre of [10, 20, 30, 40] = ((10 + 30) / 2, (20 + 40) / 2) = (20, 30)
    assert parse_point("[10, 20, 30, 40]") == (20.0, 30.0)


def test_parse_point_xy_assignment_normalized() -> None:
    # x = 0.5 * 200 = 100, y = 0.25 * 100 = 25
    assert parse_point("x=0.5, y=0.25", "normalized_1", (200, 100)) == (100.0, 25.0)


def test_parse_point_qwen_corner_pair_thousandths() -> None:
    # centre = (200, 300) in thousandths; x = 200/1000 * 1000 = 200, y = 300/1000 * 500 = 150
    text = "<|box_start|>(100,200),(300,400)<|box_end|>"
    assert parse_point(text, "normalized_1000", (1000, 500)) == pytest.approx((200.0, 150.0))


def test_parse_point_without_numbers_returns_none() -> None:
    assert parse_point("I cannot find it.") is None


def test_parse_point_normalized_needs_image_size() -> None:
    with pytest.raises(ValueError, match="image_size"):
        parse_point("(0.5, 0.5)", "normalized_1")


def test_parse_point_unknown_scale_raises() -> None:
    with pytest.raises(ValueError, match="coordinate_scale"):
        parse_point("(1, 2)", "percent")


def test_point_in_box_includes_border() -> None:
    assert point_in_box((10, 20), (10, 20, 30, 40))
    assert point_in_box((30, 40), (10, 20, 30, 40))


def test_point_outside_box() -> None:
    assert not point_in_box((31, 25), (10, 20, 30, 40))


def test_point_in_box_rejects_xywh_like_box() -> None:
    with pytest.raises(ValueError, match="x2 < x1"):
        point_in_box((1, 1), (10, 20, 5, 5))


def test_screenspot_correct_unparsable_is_wrong() -> None:
    assert not screenspot_correct("no idea", (0, 0, 10, 10))


def test_screenspot_accuracy_fraction_of_hits() -> None:
    # (5, 5) in box, (50, 50) outside, centre of [0, 0, 8, 8] = (4, 4) in box -> 2 / 3
    preds = ["(5, 5)", "(50, 50)", "[0, 0, 8, 8]"]
    assert screenspot_accuracy(preds, [(0, 0, 10, 10)] * 3) == pytest.approx(2 / 3)
