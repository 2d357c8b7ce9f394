"""Official-style metrics of common multimodal (VLM) benchmarks, in pure Python / NumPy.

Every metric comes as a pair: a function that scores one prediction and a function that
aggregates a list of predictions. The metrics are implemented from their public definitions:

* ``anls`` -- Average Normalised Levenshtein Similarity (DocVQA), threshold ``tau = 0.5``.
* ``vqa_accuracy`` -- VQA v2 accuracy with the VQA answer normalisation (TextVQA).
* ``relaxed_accuracy`` -- ChartQA relaxed accuracy (5% relative tolerance on numbers).
* ``ocrbench`` -- OCRBench substring matching (score = number of correct answers).
* ``cider_d`` -- CIDEr-D (TextCaps), with a simple tokenizer approximating the PTB tokenizer.
* ``point_in_box`` -- ScreenSpot click accuracy, with a parser of points and boxes in model text.
* ``multiple_choice`` -- the option letter of a Video-MME style answer.
* ``exact_match``, ``mark_in_box``, ``numbers_recall`` -- the tiny VLM's tasks: the first word
  or number of the answer, the set-of-marks button the answer names, and the fraction of the
  numbers asked for that an answer reading several regions gives in place.

The module's one job is these metrics as their benchmarks define them; it is long because each
follows its official rules in full (VQA's answer normalisation, CIDEr-D's document frequencies,
ScreenSpot's point formats). :func:`~mixkv.eval.mm_example.score_examples` applies them to
examples.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "COORDINATE_SCALES",
    "METRIC_NAMES",
    "CiderD",
    "OCRBenchResult",
    "anls",
    "caption_tokenize",
    "cider_d",
    "cider_d_scores",
    "exact_match",
    "levenshtein_distance",
    "mark_in_box",
    "mean_anls",
    "mean_multiple_choice_accuracy",
    "mean_relaxed_accuracy",
    "mean_vqa_accuracy",
    "normalize_vqa_answer",
    "numbers_recall",
    "ocrbench_correct",
    "ocrbench_score",
    "parse_point",
    "point_in_box",
    "relaxed_accuracy",
    "screenspot_accuracy",
    "screenspot_correct",
    "vqa_accuracy",
]

METRIC_NAMES: tuple[str, ...] = (
    "anls",
    "vqa_accuracy",
    "relaxed_accuracy",
    "ocrbench",
    "cider_d",
    "point_in_box",
    "multiple_choice",
    "exact_match",
    "mark_in_box",
    "numbers_recall",
)
"""Names of the metrics, as used in ``MMExample.metric``."""

COORDINATE_SCALES: tuple[str, ...] = ("pixel", "normalized_1", "normalized_1000")
"""Coordinate conventions accepted by :func:`parse_point`."""

Box = tuple[float, float, float, float]
Point = tuple[float, float]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _as_answer_list(answers: str | Sequence[str], what: str) -> list[str]:
    """Return ``answers`` as a non-empty list of strings.

    Parameters
    ----------
    answers : str or sequence of str
        One reference answer or several.
    what : str
        Name of the calling metric, used in error messages.

    Returns
    -------
    list of str
        The reference answers.

    Raises
    ------
    ValueError
        If there is no reference answer or an answer is not a string.
    """
    out = [answers] if isinstance(answers, str) else list(answers)
    if not out:
        raise ValueError(f"{what}: `answers` is empty; pass at least one reference answer per question.")
    for a in out:
        if not isinstance(a, str):
            raise ValueError(f"{what}: every reference answer must be a str, got {type(a).__name__}.")
    return out


def _check_same_length(predictions: Sequence[object], references: Sequence[object], what: str) -> None:
    """Raise ``ValueError`` unless both sequences are non-empty and equally long."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{what}: got {len(predictions)} predictions but {len(references)} reference entries; "
            "pass one reference entry per prediction."
        )
    if not predictions:
        raise ValueError(f"{what}: no predictions to score; pass at least one.")


def levenshtein_distance(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each of cost 1) between two strings.

    Parameters
    ----------
    a, b : str
        Strings to compare.

    Returns
    -------
    int
        The Levenshtein distance.
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


# ----------------------------------------------------------------------------------------------
# ANLS (DocVQA)
# ----------------------------------------------------------------------------------------------
def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """Normalised Levenshtein similarity of one prediction (DocVQA's ANLS for one question).

    Both strings are lower-cased and stripped of surrounding whitespace. For each reference,
    ``NL = levenshtein(pred, ref) / max(len(pred), len(ref))``; the similarity is ``1 - NL`` when
    ``NL < threshold`` and ``0`` otherwise. The score is the maximum over the references. Two
    empty strings have ``NL = 0``.

    Parameters
    ----------
    prediction : str
        Model answer.
    answers : str or sequence of str
        Reference answers.
    threshold : float, default 0.5
        ``tau`` of the ANLS definition, in ``(0, 1]``.

    Returns
    -------
    float
        Similarity in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``answers`` is empty or ``threshold`` is outside ``(0, 1]``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"anls: threshold must be in (0, 1], got {threshold}.")
    refs = _as_answer_list(answers, "anls")
    pred = prediction.strip().lower()
    best = 0.0
    for ref in refs:
        gt = ref.strip().lower()
        longest = max(len(pred), len(gt))
        nl = 0.0 if longest == 0 else levenshtein_distance(pred, gt) / longest
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def mean_anls(
    predictions: Sequence[str], answers_list: Sequence[str | Sequence[str]], threshold: float = 0.5
) -> float:
    """Dataset ANLS: the mean of :func:`anls` over questions.

    Parameters
    ----------
    predictions : sequence of str
        One model answer per question.
    answers_list : sequence of (str or sequence of str)
        Reference answers of each question.
    threshold : float, default 0.5
        ``tau`` of the ANLS definition.

    Returns
    -------
    float
        Mean ANLS in ``[0, 1]``.
    """
    _check_same_length(predictions, answers_list, "mean_anls")
    return float(np.mean([anls(p, a, threshold) for p, a in zip(predictions, answers_list, strict=True)]))


# ----------------------------------------------------------------------------------------------
# VQA accuracy (TextVQA)
# ----------------------------------------------------------------------------------------------
_VQA_PUNCTUATION: tuple[str, ...] = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# Contractions written without their apostrophe, mapped to the apostrophe form.
_VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "im": "i'm",
    "ive": "i've",
    "isnt": "isn't",
    "itd": "it'd",
    "itll": "it'll",
    "lets": "let's",
    "maam": "ma'am",
    "mightve": "might've",
    "mightnt": "mightn't",
    "mustve": "must've",
    "mustnt": "mustn't",
    "neednt": "needn't",
    "oclock": "o'clock",
    "shant": "shan't",
    "shed": "she'd",
    "shes": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "thats": "that's",
    "thered": "there'd",
    "theres": "there's",
    "theyd": "they'd",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "wasnt": "wasn't",
    "wed": "we'd",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "yall": "y'all",
    "youd": "you'd",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer the way the VQA v2 evaluation does.

    Steps: newlines/tabs become spaces; each punctuation mark of the VQA list is deleted when
    it touches a space or the text contains a digit-comma-digit group, otherwise it becomes a
    space; periods not followed by a digit are removed; the text is lower-cased and split into
    words; number words ``zero``..``ten`` (and ``none``) become digits; the articles ``a``,
    ``an``, ``the`` are dropped; contractions written without apostrophe (``dont``) get it back.

    Parameters
    ----------
    text : str
        Raw answer.

    Returns
    -------
    str
        Normalised answer (words joined by single spaces).
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _VQA_PUNCTUATION:
        if (p + " " in text) or (" " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out)
    words: list[str] = []
    for word in out.lower().split():
        word = _VQA_NUMBER_WORDS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(_VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA v2 accuracy of one prediction against the human answers (10 in TextVQA).

    The prediction and every human answer are normalised with :func:`normalize_vqa_answer`.
    For each of the ``n`` leave-one-out subsets of the human answers the accuracy is
    ``min(1, #matches / 3)``; the score is their mean. With a single reference the
    leave-one-out subsets would be empty, so the score falls back to exact match (1 or 0).

    Note that the original evaluation script normalises only when the human answers
    disagree; this implementation always normalises (as most re-implementations do).

    Parameters
    ----------
    prediction : str
        Model answer.
    answers : sequence of str
        Human answers (repetitions matter).

    Returns
    -------
    float
        Accuracy in ``[0, 1]``.
    """
    refs = [normalize_vqa_answer(a) for a in _as_answer_list(answers, "vqa_accuracy")]
    pred = normalize_vqa_answer(prediction)
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = [r == pred for r in refs]
    total_matches = sum(matches)
    scores = [min(1.0, (total_matches - m) / 3.0) for m in matches]
    return float(np.mean(scores))


def mean_vqa_accuracy(predictions: Sequence[str], answers_list: Sequence[Sequence[str]]) -> float:
    """Mean of :func:`vqa_accuracy` over questions.

    Parameters
    ----------
    predictions : sequence of str
        One model answer per question.
    answers_list : sequence of sequence of str
        Human answers of each question.

    Returns
    -------
    float
        Mean accuracy in ``[0, 1]``.
    """
    _check_same_length(predictions, answers_list, "mean_vqa_accuracy")
    return float(np.mean([vqa_accuracy(p, a) for p, a in zip(predictions, answers_list, strict=True)]))


# ----------------------------------------------------------------------------------------------
# Relaxed accuracy (ChartQA)
# ----------------------------------------------------------------------------------------------
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")


def _parse_chart_number(text: str) -> float | None:
    """Parse a chart answer as a number, or return ``None``.

    Surrounding whitespace, one leading currency sign (``$``, ``€``, ``£``), one trailing
    ``%`` and thousands separators (``1,234.5``) are removed. A percent sign is *not* turned
    into a factor of 1/100, so ``"45%"`` and ``"45"`` are the same number.
    """
    s = text.strip()
    if s[:1] in ("$", "€", "£"):
        s = s[1:].strip()
    if s.endswith("%"):
        s = s[:-1].strip()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def relaxed_accuracy(prediction: str, answers: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy of one prediction.

    If both the prediction and a reference parse as numbers (see below), the prediction is
    correct when ``|pred - ref| / |ref| <= tolerance``; a reference of exactly 0 requires a
    prediction of exactly 0. Otherwise the prediction must equal the reference after
    lower-casing and stripping whitespace. With several references the best one counts.

    Number parsing: one leading currency sign (``$``, ``€``, ``£``), one trailing ``%`` and
    thousands separators (``1,234``) are ignored. ``%`` is not rescaled, so ``"45%"`` equals
    ``"45"`` (the pix2struct reference code divides by 100, which differs only when exactly
    one side carries ``%``).

    Parameters
    ----------
    prediction : str
        Model answer.
    answers : str or sequence of str
        Reference answer(s) (ChartQA has one).
    tolerance : float, default 0.05
        Relative tolerance for numeric answers.

    Returns
    -------
    float
        1.0 if correct, 0.0 otherwise.
    """
    if tolerance < 0:
        raise ValueError(f"relaxed_accuracy: tolerance must be >= 0, got {tolerance}.")
    refs = _as_answer_list(answers, "relaxed_accuracy")
    pred_num = _parse_chart_number(prediction)
    for ref in refs:
        ref_num = _parse_chart_number(ref)
        if pred_num is not None and ref_num is not None:
            if ref_num == 0.0:
                if pred_num == 0.0:
                    return 1.0
            elif abs(pred_num - ref_num) / abs(ref_num) <= tolerance:
                return 1.0
        elif prediction.strip().lower() == ref.strip().lower():
            return 1.0
    return 0.0


def mean_relaxed_accuracy(
    predictions: Sequence[str], answers_list: Sequence[str | Sequence[str]], tolerance: float = 0.05
) -> float:
    """Mean of :func:`relaxed_accuracy` over questions.

    Parameters
    ----------
    predictions : sequence of str
        One model answer per question.
    answers_list : sequence of (str or sequence of str)
        Reference answer(s) of each question.
    tolerance : float, default 0.05
        Relative tolerance for numeric answers.

    Returns
    -------
    float
        Mean accuracy in ``[0, 1]``.
    """
    _check_same_length(predictions, answers_list, "mean_relaxed_accuracy")
    return float(
        np.mean([relaxed_accuracy(p, a, tolerance) for p, a in zip(predictions, answers_list, strict=True)])
    )


# ----------------------------------------------------------------------------------------------
# OCRBench
# ----------------------------------------------------------------------------------------------
_HANDWRITTEN_MATH = frozenset({"hme100k", "handwritten mathematical expression recognition"})


@dataclass(frozen=True)
class OCRBenchResult:
    """Aggregate OCRBench result.

    Attributes
    ----------
    correct : int
        Number of correct predictions (OCRBench's score; out of 1000 on the full benchmark).
    total : int
        Number of scored predictions.
    accuracy : float
        ``correct / total``, a scale-free version of the score.
    per_category : dict of str to (int, int)
        ``(correct, total)`` per category (empty string for unlabelled examples).
    """

    correct: int
    total: int
    accuracy: float
    per_category: dict[str, tuple[int, int]] = field(default_factory=dict)


def ocrbench_correct(prediction: str, answers: str | Sequence[str], category: str = "") -> bool:
    """OCRBench correctness of one prediction.

    The prediction is correct when some reference answer is a substring of it. Normally both
    are lower-cased, stripped and have newlines replaced by spaces. For handwritten
    mathematical expressions (``category`` ``"HME100k"`` or ``"Handwritten Mathematical
    Expression Recognition"``, case-insensitive) all spaces and newlines are removed instead
    and case is kept, as in the official scorer (LaTeX is case-sensitive).

    Parameters
    ----------
    prediction : str
        Model answer.
    answers : str or sequence of str
        Reference answer(s).
    category : str, default ""
        OCRBench ``dataset_name`` or ``type`` of the example.

    Returns
    -------
    bool
        Whether the prediction is correct.
    """
    refs = _as_answer_list(answers, "ocrbench_correct")
    if category.strip().lower() in _HANDWRITTEN_MATH:
        pred = prediction.strip().replace("\n", "").replace(" ", "")
        return any((r.strip().replace("\n", "").replace(" ", "")) in pred for r in refs)
    pred = prediction.lower().strip().replace("\n", " ")
    return any(r.lower().strip().replace("\n", " ") in pred for r in refs)


def ocrbench_score(
    predictions: Sequence[str],
    answers_list: Sequence[str | Sequence[str]],
    categories: Sequence[str] | None = None,
) -> OCRBenchResult:
    """Aggregate OCRBench score.

    Parameters
    ----------
    predictions : sequence of str
        One model answer per question.
    answers_list : sequence of (str or sequence of str)
        Reference answer(s) of each question.
    categories : sequence of str, optional
        Category (``dataset_name`` or ``type``) of each question; needed for the
        handwritten-math rule and the per-category breakdown.

    Returns
    -------
    OCRBenchResult
        Number correct, total, accuracy and per-category counts.
    """
    _check_same_length(predictions, answers_list, "ocrbench_score")
    cats = [""] * len(predictions) if categories is None else list(categories)
    if len(cats) != len(predictions):
        raise ValueError(
            f"ocrbench_score: got {len(cats)} categories for {len(predictions)} predictions; "
            "pass one category per prediction or None."
        )
    per_category: dict[str, tuple[int, int]] = {}
    correct = 0
    for pred, refs, cat in zip(predictions, answers_list, cats, strict=True):
        ok = ocrbench_correct(pred, refs, cat)
        correct += ok
        c, t = per_category.get(cat, (0, 0))
        per_category[cat] = (c + ok, t + 1)
    return OCRBenchResult(
        correct=correct,
        total=len(predictions),
        accuracy=correct / len(predictions),
        per_category=per_category,
    )


# ----------------------------------------------------------------------------------------------
# CIDEr-D (TextCaps)
# ----------------------------------------------------------------------------------------------
_CAPTION_TOKEN = re.compile(r"[^\W_]+(?:[-'.][^\W_]+)*")


def caption_tokenize(text: str) -> list[str]:
    """Tokenise a caption for CIDEr-D.

    Lower-cases and keeps runs of letters/digits, allowing inner ``-``, ``'`` and ``.``
    (``well-known``, ``don't``, ``3.5``); all other punctuation is dropped. This approximates
    the Stanford PTB tokenizer plus punctuation removal of the COCO caption toolkit; it
    differs e.g. on contractions (PTB splits ``don't`` into ``do n't``).

    Parameters
    ----------
    text : str
        Caption.

    Returns
    -------
    list of str
        Tokens.
    """
    return _CAPTION_TOKEN.findall(text.lower())


def _ngram_counts(tokens: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    """Counts of all n-grams of ``tokens`` with ``1 <= n <= max_n``."""
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


class CiderD:
    """CIDEr-D scorer whose document frequencies come from a reference corpus.

    For each n in ``1..n`` a caption is the TF-IDF vector ``count(g) * (log(N) - log(df(g)))``
    of its n-grams ``g``, where ``N`` is the number of images of the corpus and ``df(g)`` the
    number of images whose references contain ``g`` (at least 1). For a candidate ``c`` and a
    reference ``r`` of the same image,
    ``sim_n = sum_g min(c_g, r_g) * r_g / (|c| |r|) * exp(-(len(c) - len(r))**2 / (2 sigma**2))``
    (the ``min`` clips candidate n-grams by the reference). The score of an image is
    ``10 * mean_n mean_r sim_n``.

    Parameters
    ----------
    references_list : sequence of sequence of str
        Reference captions of every image of the corpus (defines ``N`` and ``df``).
    n : int, default 4
        Largest n-gram order.
    sigma : float, default 6.0
        Standard deviation of the gaussian length penalty.

    Notes
    -----
    With a single image ``log(N) = 0`` and every weight is 0, so CIDEr-D is a corpus-level
    metric: build the scorer on the whole evaluation set.
    """

    def __init__(self, references_list: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> None:
        if n < 1:
            raise ValueError(f"CiderD: n must be >= 1, got {n}.")
        if sigma <= 0:
            raise ValueError(f"CiderD: sigma must be > 0, got {sigma}.")
        if not references_list:
            raise ValueError("CiderD: the reference corpus is empty; pass the references of every image.")
        self.n = n
        self.sigma = sigma
        self.document_frequency: Counter[tuple[str, ...]] = Counter()
        for refs in references_list:
            ref_list = _as_answer_list(refs, "CiderD")
            seen: set[tuple[str, ...]] = set()
            for ref in ref_list:
                seen.update(_ngram_counts(caption_tokenize(ref), n))
            self.document_frequency.update(seen)
        self.log_num_images = math.log(float(len(references_list)))

    def _vector(self, caption: str) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        """TF-IDF vectors per n-gram order, their norms, and the caption length in tokens."""
        tokens = caption_tokenize(caption)
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        for gram, tf in _ngram_counts(tokens, self.n).items():
            df = math.log(max(1.0, float(self.document_frequency[gram])))
            vec[len(gram) - 1][gram] = tf * (self.log_num_images - df)
        norms = [math.sqrt(sum(v * v for v in order.values())) for order in vec]
        return vec, norms, len(tokens)

    def score(self, prediction: str, references: Sequence[str]) -> float:
        """CIDEr-D of one candidate caption against the references of its image.

        Parameters
        ----------
        prediction : str
            Candidate caption.
        references : sequence of str
            Reference captions of the same image.

        Returns
        -------
        float
            CIDEr-D score (``x10`` scaled; 0 when nothing matches).
        """
        refs = _as_answer_list(references, "CiderD.score")
        c_vec, c_norm, c_len = self._vector(prediction)
        total = np.zeros(self.n)
        for ref in refs:
            r_vec, r_norm, r_len = self._vector(ref)
            penalty = math.exp(-((c_len - r_len) ** 2) / (2.0 * self.sigma**2))
            for k in range(self.n):
                dot = sum(min(v, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0) for g, v in c_vec[k].items())
                if c_norm[k] != 0.0 and r_norm[k] != 0.0:
                    total[k] += dot / (c_norm[k] * r_norm[k]) * penalty
        return float(np.mean(total) / len(refs) * 10.0)


def cider_d_scores(
    predictions: Sequence[str], references_list: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-image CIDEr-D, with document frequencies taken from ``references_list``.

    Parameters
    ----------
    predictions : sequence of str
        One candidate caption per image.
    references_list : sequence of sequence of str
        Reference captions of each image (the whole corpus).
    n : int, default 4
        Largest n-gram order.
    sigma : float, default 6.0
        Length-penalty standard deviation.

    Returns
    -------
    list of float
        CIDEr-D of each image.
    """
    _check_same_length(predictions, references_list, "cider_d_scores")
    scorer = CiderD(references_list, n=n, sigma=sigma)
    return [scorer.score(p, r) for p, r in zip(predictions, references_list, strict=True)]


def cider_d(
    predictions: Sequence[str], references_list: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_d_scores`.

    Parameters
    ----------
    predictions : sequence of str
        One candidate caption per image.
    references_list : sequence of sequence of str
        Reference captions of each image.
    n : int, default 4
        Largest n-gram order.
    sigma : float, default 6.0
        Length-penalty standard deviation.

    Returns
    -------
    float
        Mean CIDEr-D on the toolkit's scale (already x10; papers usually print it x100,
        e.g. ``0.95`` is reported as ``95``).
    """
    return float(np.mean(cider_d_scores(predictions, references_list, n=n, sigma=sigma)))


# ----------------------------------------------------------------------------------------------
# Point in box (ScreenSpot)
# ----------------------------------------------------------------------------------------------
_NUM = r"([-+]?\d+(?:\.\d+)?)"
_OPEN = r"[\(\[]\s*"
_CLOSE = r"\s*[\)\]]"
_SEP = r"\s*,\s*"
_TWO_POINT_BOX = re.compile(
    _OPEN + _NUM + _SEP + _NUM + _CLOSE + r"\s*(?:,|to|-)?\s*" + _OPEN + _NUM + _SEP + _NUM + _CLOSE
)
_FOUR_NUMBER_BOX = re.compile(_OPEN + _NUM + _SEP + _NUM + _SEP + _NUM + _SEP + _NUM + _CLOSE)
_XY_ASSIGN = re.compile(
    r"\bx\s*[=:]\s*" + _NUM + r"\s*[,;]?\s*(?:and\s+)?\by\s*[=:]\s*" + _NUM, flags=re.IGNORECASE
)
_POINT = re.compile(_OPEN + _NUM + _SEP + _NUM + _CLOSE)


def _check_box(bbox: Sequence[float]) -> Box:
    """Validate an ``(x1, y1, x2, y2)`` box and return it as floats."""
    if len(bbox) != 4:
        raise ValueError(f"bbox must have 4 numbers (x1, y1, x2, y2), got {len(bbox)}.")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if x2 < x1 or y2 < y1:
        raise ValueError(
            f"bbox {tuple(bbox)} has x2 < x1 or y2 < y1; pass (x1, y1, x2, y2) corners, "
            "not (x, y, width, height)."
        )
    return x1, y1, x2, y2


def parse_point(
    text: str, coordinate_scale: str = "pixel", image_size: tuple[int, int] | None = None
) -> Point | None:
    """Extract a click point from model output and return it in pixels.

    Recognised forms, tried in this order (the first match of the first form that matches):

    1. two corners ``(x1, y1), (x2, y2)`` (Qwen2-VL box style) -> centre of the box;
    2. a box ``[x1, y1, x2, y2]`` or ``(x1, y1, x2, y2)`` -> centre of the box;
    3. ``x=.., y=..`` (also ``x: .., y: ..``);
    4. a point ``(x, y)`` or ``[x, y]``.

    The model's coordinate convention must be given; it is not guessed.

    Parameters
    ----------
    text : str
        Model output.
    coordinate_scale : {"pixel", "normalized_1", "normalized_1000"}, default "pixel"
        ``"pixel"``: absolute pixels of the original image; ``"normalized_1"``: fractions of
        the width/height in ``[0, 1]``; ``"normalized_1000"``: thousandths of the
        width/height in ``[0, 1000)`` as emitted by Qwen2-VL.
    image_size : (int, int), optional
        ``(width, height)`` of the image; required unless ``coordinate_scale="pixel"``.

    Returns
    -------
    (float, float) or None
        ``(x, y)`` in pixels, or ``None`` if no coordinates were found.

    Raises
    ------
    ValueError
        If ``coordinate_scale`` is unknown or ``image_size`` is missing for a normalised scale.
    """
    if coordinate_scale not in COORDINATE_SCALES:
        raise ValueError(
            f"parse_point: coordinate_scale must be one of {COORDINATE_SCALES}, got {coordinate_scale!r}."
        )
    if coordinate_scale != "pixel" and image_size is None:
        raise ValueError(
            f"parse_point: coordinate_scale={coordinate_scale!r} needs image_size=(width, height) "
            "to convert to pixels."
        )
    point: Point | None = None
    for pattern in (_TWO_POINT_BOX, _FOUR_NUMBER_BOX):
        match = pattern.search(text)
        if match is not None:
            x1, y1, x2, y2 = (float(g) for g in match.groups())
            point = ((x1 + x2) / 2.0, (y1 + y2) / 2.0)
            break
    if point is None:
        for pattern in (_XY_ASSIGN, _POINT):
            match = pattern.search(text)
            if match is not None:
                point = (float(match.group(1)), float(match.group(2)))
                break
    if point is None:
        return None
    if coordinate_scale == "pixel":
        return point
    assert image_size is not None
    divisor = 1.0 if coordinate_scale == "normalized_1" else 1000.0
    width, height = image_size
    return point[0] / divisor * width, point[1] / divisor * height


def point_in_box(point: Sequence[float], bbox: Sequence[float]) -> bool:
    """Whether a point lies inside (or on the border of) a box.

    Parameters
    ----------
    point : (float, float)
        ``(x, y)``.
    bbox : (float, float, float, float)
        ``(x1, y1, x2, y2)`` with ``x1 <= x2`` and ``y1 <= y2``, same units as ``point``.

    Returns
    -------
    bool
        ``x1 <= x <= x2 and y1 <= y <= y2``.
    """
    if len(point) != 2:
        raise ValueError(f"point must be (x, y), got {len(point)} numbers.")
    x1, y1, x2, y2 = _check_box(bbox)
    x, y = float(point[0]), float(point[1])
    return x1 <= x <= x2 and y1 <= y <= y2


def screenspot_correct(
    prediction: str,
    bbox: Sequence[float],
    image_size: tuple[int, int] | None = None,
    coordinate_scale: str = "pixel",
) -> bool:
    """ScreenSpot correctness of one model output: the parsed point falls in the target box.

    Parameters
    ----------
    prediction : str
        Model output (see :func:`parse_point` for the recognised forms).
    bbox : (float, float, float, float)
        Target box ``(x1, y1, x2, y2)`` in pixels.
    image_size : (int, int), optional
        ``(width, height)``; required for normalised coordinate scales.
    coordinate_scale : {"pixel", "normalized_1", "normalized_1000"}, default "pixel"
        Coordinate convention of the model output.

    Returns
    -------
    bool
        ``False`` when no point can be parsed.
    """
    point = parse_point(prediction, coordinate_scale=coordinate_scale, image_size=image_size)
    return point is not None and point_in_box(point, bbox)


def screenspot_accuracy(
    predictions: Sequence[str],
    bboxes: Sequence[Sequence[float]],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    coordinate_scale: str = "pixel",
) -> float:
    """Fraction of outputs whose parsed point falls in the target box.

    Parameters
    ----------
    predictions : sequence of str
        Model outputs.
    bboxes : sequence of (float, float, float, float)
        Target boxes ``(x1, y1, x2, y2)`` in pixels.
    image_sizes : sequence of (int, int), optional
        ``(width, height)`` of each image; required for normalised coordinate scales.
    coordinate_scale : {"pixel", "normalized_1", "normalized_1000"}, default "pixel"
        Coordinate convention of the model outputs.

    Returns
    -------
    float
        Accuracy in ``[0, 1]``.
    """
    _check_same_length(predictions, bboxes, "screenspot_accuracy")
    sizes: list[tuple[int, int] | None] = (
        [None] * len(predictions) if image_sizes is None else list(image_sizes)
    )
    if len(sizes) != len(predictions):
        raise ValueError(
            f"screenspot_accuracy: got {len(sizes)} image sizes for {len(predictions)} predictions; "
            "pass one (width, height) per prediction."
        )
    hits = [
        screenspot_correct(p, b, s, coordinate_scale)
        for p, b, s in zip(predictions, bboxes, sizes, strict=True)
    ]
    return float(np.mean(hits))


# ----------------------------------------------------------------------------------------------
# Multiple choice (Video-MME style: the answer is an option letter)
# ----------------------------------------------------------------------------------------------

# a letter alone or closed by ")", "." or ":" ("I think" chooses nothing)
_LEADING_LETTER = re.compile(r"^\W*([A-Z])(?:$|[).:])")
_STATED_LETTER = re.compile(r"\b(?:answer|option)\b\W*(?:is\W*)?\(?([A-Z])\b", re.IGNORECASE)


def multiple_choice_letter(prediction: str) -> str | None:
    """The option letter a model output chooses: a leading capital letter standing alone or closed
    by ``)``, ``.`` or ``:`` (``"B"``, ``"(B) dog"``, ``"B. dog"``), else the letter after "answer"/"option" (``"The answer is B"``); None if neither."""
    match = _LEADING_LETTER.match(prediction.strip()) or _STATED_LETTER.search(prediction)
    return match.group(1).upper() if match else None


def mean_multiple_choice_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Fraction of outputs whose chosen letter (:func:`multiple_choice_letter`) is the reference letter."""
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions for {len(answers)} answer lists")
    if not predictions:
        return 0.0
    correct = sum(
        multiple_choice_letter(pred) in {a.strip().upper() for a in refs}
        for pred, refs in zip(predictions, answers, strict=True)
    )
    return correct / len(predictions)


# ----------------------------------------------------------------------------------------------
# Exact match and set-of-marks grounding (the tiny VLM's tasks)
# ----------------------------------------------------------------------------------------------
_FIRST_WORD = re.compile(r"\S+")
_FIRST_INTEGER = re.compile(r"\d+")


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the prediction's first word, without surrounding punctuation, equals a reference.

    Codes and chart values are read, not estimated, so no tolerance: ``"482913."`` matches
    ``"482913"``, ``"482918"`` does not.
    """
    refs = _as_answer_list(answers, "exact_match")
    match = _FIRST_WORD.search(prediction)
    word = match.group().strip(".,;:!?\"'()[]") if match else ""
    return 1.0 if word and word in {r.strip() for r in refs} else 0.0


def mark_in_box(prediction: str, marks: Mapping[str, Sequence[float]], bbox: Sequence[float]) -> float:
    """Set-of-marks grounding: the first integer of the prediction names a mark; the answer's point is
    the centre of that mark's box; 1.0 when the point lies in ``bbox`` (x1, y1, x2, y2, pixels)."""
    match = _FIRST_INTEGER.search(prediction)
    box = marks.get(match.group()) if match else None
    if box is None:
        return 0.0
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return 1.0 if point_in_box(centre, bbox) else 0.0


def numbers_recall(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of the numbers asked for that the prediction reads in place.

    For answers that read several regions (two codes, two values): ``answers`` is the list of every
    number asked for, in the order the question names them, not a list of alternatives. The
    ``k``-th integer of the prediction is compared with the ``k``-th answer, so each region's read
    counts once, as in RULER's multi-value recall (``string_match_all``) but by position: a number
    given for the wrong row does not count. ``"388474\\nYara Pope: 678791"`` scores 1.0 against
    ``["388474", "678791"]``, ``"388474\\nYara Pope: 678"`` 0.5, ``"678791\\nGus Snow: 388474"`` 0.0.

    Raises
    ------
    ValueError
        If ``answers`` is empty or holds anything but digits.
    """
    refs = _as_answer_list(answers, "numbers_recall")
    if not all(r.isdigit() for r in refs):
        raise ValueError(
            f"numbers_recall: every reference must be an integer written in digits, got {refs!r}."
        )
    found = _FIRST_INTEGER.findall(prediction)[: len(refs)]
    return sum(f == r for f, r in zip(found, refs, strict=False)) / len(refs)
