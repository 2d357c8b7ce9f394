"""RULER-style long-context text tasks: needles, variable tracking, word frequencies, QA.

Every task builds a context of a requested length from the building blocks of
:mod:`mixkv.eval.haystack`, a question and the expected answer strings, scored with RULER's string
match (:func:`~mixkv.eval.text_example.score_output`).

``niah_single_1``
    One needle (``key -> 7-digit number``) in a repeated noise haystack ("The grass is green. ...").
``niah_single_2``
    Same needle in a natural-language haystack made of Python standard-library docstrings.
``niah_single_3``
    Docstring haystack, the needle's value is a UUID.
``niah_multikey_1``
    Docstring haystack with four needles of different keys; one is asked.
``niah_multikey_2``
    The haystack is made of needles only (distinct keys, numbers); one is asked.
``niah_multikey_3``
    Needles-only haystack where keys and values are UUIDs; one is asked.
``niah_multivalue``
    Four needles share one key; all four values are expected.
``niah_multiquery``
    Four needles with different keys; all four are asked at once.
``vt``
    Variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A`` ... hidden in noise; all names
    bound to the value are expected.
``cwe``
    Common-words extraction: a numbered word list where ten words are frequent; those ten are
    expected.
``fwe``
    Frequent-words extraction: coded words drawn from a Zipf law; the three most frequent are
    expected.
``qa``
    Question answering over generated documents about fictional towns; one document holds the
    answer, the others are distractors.
"""

from __future__ import annotations

import random
from typing import Any

from mixkv.eval.haystack import (
    corpus_words,
    docs_max_fine,
    fit_context,
    haystack_units,
    insert_at_depths,
    noise_filler,
    random_number,
    random_uuid,
    stdlib_sentences,
    word_keys,
)
from mixkv.eval.text_example import TextExample

__all__ = ["RULER_TASKS", "make_ruler_example"]

#: Task names defined here.
RULER_TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa",
)

_FIRST_NAMES = (
    "Adele", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hector", "Ingrid", "Jonas",
    "Kiran", "Lucia", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Stefan", "Tamsin",
)  # fmt: skip

_LAST_NAMES = (
    "Albrecht", "Baranov", "Castellano", "Delacroix", "Eriksen", "Fontaine", "Galloway", "Hartmann",
    "Ishikawa", "Jovanovic", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Pellegrini",
    "Quist", "Rautio", "Sandoval", "Thorne",
)  # fmt: skip

_EXPORTS = (
    "copper", "wool", "saffron", "glassware", "timber", "honey", "salt", "porcelain", "cider",
    "linen", "tin", "cheese", "olive oil", "silk", "amber jewellery", "barley", "leather", "marble",
)  # fmt: skip

_SYLLABLES = (
    "ka", "lo", "mer", "va", "din", "sol", "tra", "ben", "qui", "ros", "el", "mar", "to", "ni",
    "gar", "bel", "zu", "fen", "ost", "ri", "lan", "cor", "vi", "dor",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Task builders. Each returns the fitted example; all random draws happen before fitting so that
# the result does not depend on the search.

_NIAH_PREAMBLE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n"
)


def _niah(
    task: str,
    tokenizer: Any,
    length: int,
    rng: random.Random,
    *,
    haystack: str,
    value_kind: str,
    key_kind: str,
    n_keys: int,
    n_values: int,
    n_queries: int,
) -> TextExample:
    noun = "numbers" if value_kind == "number" else "uuids"
    singular = noun[:-1]
    draw_value = random_number if value_kind == "number" else random_uuid
    keys = [random_uuid(rng) for _ in range(n_keys)] if key_kind == "uuid" else word_keys(rng, n_keys)
    needles: list[str] = []
    values: dict[str, list[str]] = {}
    for key in keys:
        vals = [draw_value(rng) for _ in range(n_values if n_values > 1 else 1)]
        values[key] = vals
        needles.extend(f"One of the special magic {noun} for {key} is: {v}." for v in vals)
    depths = [rng.random() for _ in needles]
    asked = keys[:n_queries]
    offset = rng.randrange(len(stdlib_sentences()))
    # needles-only haystack: distractor needles with their own keys and values
    n_distractors = 0
    distractor_keys: list[str] = []
    distractor_vals: list[str] = []
    if haystack == "needles":
        n_distractors = 4 * length  # upper bound, enough for any fit
        if key_kind == "uuid":
            distractor_keys = [random_uuid(rng) for _ in range(min(n_distractors, length))]
        else:
            distractor_keys = word_keys(rng, min(n_distractors, length), exclude=set(keys))
        distractor_vals = [draw_value(rng) for _ in distractor_keys]
    preamble = _NIAH_PREAMBLE.format(kind=noun)

    def build(k: int, fine: int) -> str:
        if haystack == "needles":
            k = min(k, len(distractor_keys))
            units = [
                f"One of the special magic {noun} for {dk} is: {dv}."
                for dk, dv in zip(distractor_keys[:k], distractor_vals[:k], strict=True)
            ]
            return preamble + " ".join(insert_at_depths(units, needles, depths)) + noise_filler(fine)
        units = haystack_units(haystack, k, offset, fine)
        # needles go between whole sentences, never inside the partial last one
        n_whole = k
        body = insert_at_depths(units[:n_whole], needles, depths) + units[n_whole:]
        return preamble + " ".join(body)

    if haystack == "needles":
        hint, fine_max = 25.0, (lambda k: 12)
    elif haystack == "docs":
        hint, fine_max = 25.0, docs_max_fine(offset)
    else:
        hint, fine_max = 5.0, (lambda k: 0)
    _, _, context, n_tokens = fit_context(build, tokenizer, length, task, hint, fine_max)
    if n_queries == 1 and n_values == 1:
        key = asked[0]
        question = f"What is the special magic {singular} for {key} mentioned in the provided text?"
        prefix = f"The special magic {singular} for {key} mentioned in the provided text is"
        answers = values[key]
    elif n_queries == 1:
        key = asked[0]
        question = f"What are all the special magic {noun} for {key} mentioned in the provided text?"
        prefix = f"The special magic {noun} for {key} mentioned in the provided text are"
        answers = values[key]
    else:
        joined = ", ".join(asked[:-1]) + f", and {asked[-1]}"
        question = f"What are all the special magic {noun} for {joined} mentioned in the provided text?"
        prefix = f"The special magic {noun} for {joined} mentioned in the provided text are"
        answers = [v for key in asked for v in values[key]]
    new_tokens = (16 if value_kind == "number" else 40) * max(len(answers), 1) + 8
    return TextExample(
        task=task,
        context=context,
        question=question,
        answers=answers,
        metric="all",
        answer_prefix=prefix,
        max_new_tokens=new_tokens,
        context_tokens=n_tokens,
        metadata={"needles": needles, "depths": depths, "keys": keys, "asked": asked},
    )


def _vt(task: str, tokenizer: Any, length: int, rng: random.Random) -> TextExample:
    value = str(rng.randint(10_000, 99_999))
    names: list[str] = []
    while len(names) < 5:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    statements = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))
    ]
    depths = sorted(rng.random() for _ in statements)
    preamble = "Memorize and track the chain of variable assignments hidden in the following text.\n"

    def build(k: int, fine: int) -> str:
        return preamble + " ".join(insert_at_depths(haystack_units("noise", k, 0), statements, depths))

    _, _, context, n_tokens = fit_context(build, tokenizer, length, task, 5.0)
    return TextExample(
        task=task,
        context=context,
        question=f"Find all variables that are assigned the value {value} in the text above.",
        answers=names,
        metric="all",
        answer_prefix=(
            "According to the chain of variable assignments in the text above, "
            f"{len(names)} variables are assigned the value {value}, they are:"
        ),
        max_new_tokens=40,
        context_tokens=n_tokens,
        metadata={"statements": statements, "depths": depths, "value": value},
    )


def _cwe(task: str, tokenizer: Any, length: int, rng: random.Random, seed: int) -> TextExample:
    vocab = list(corpus_words())
    rng.shuffle(vocab)
    n_common = 10
    common, uncommon = vocab[:n_common], vocab[n_common:]
    est_entries = max(length // 4, 40)
    freq_common = max(4, min(30, int(0.35 * est_entries / n_common)))
    freq_uncommon = 1 if freq_common < 8 else 3
    preamble = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n"
    )

    def build(k: int, fine: int) -> str:
        # k uncommon words appear freq_uncommon times; `fine` more appear once
        k = min(k, len(uncommon) - 16)
        words = [w for w in common for _ in range(freq_common)]
        words += [w for w in uncommon[:k] for _ in range(freq_uncommon)]
        words += uncommon[k : k + fine]
        random.Random(f"cwe-{seed}-{k}-{fine}").shuffle(words)
        return preamble + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    fine_max = (lambda k: 16) if freq_uncommon > 1 else (lambda k: 0)
    _, _, context, n_tokens = fit_context(build, tokenizer, length, task, 5.0 * freq_uncommon, fine_max)
    return TextExample(
        task=task,
        context=context,
        question=f"What are the {n_common} most common words in the above list?",
        answers=common,
        metric="all",
        answer_prefix=f"The top {n_common} words that appear most often in the list are:",
        max_new_tokens=100,
        context_tokens=n_tokens,
        metadata={"freq_common": freq_common, "freq_uncommon": freq_uncommon},
    )


def _fwe(task: str, tokenizer: Any, length: int, rng: random.Random, seed: int) -> TextExample:
    vocab: list[str] = []
    while len(vocab) < 400:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
        if word not in vocab:
            vocab.append(word)
    alpha = 2.0
    weights = [1.0 / (r + 1) ** alpha for r in range(len(vocab))]
    total_w = sum(weights)
    preamble = (
        "Read the following coded text and track the frequency of each coded word. Find the three "
        "most frequently appeared coded words.\n"
    )

    def counts_for(k: int) -> list[int]:
        counts = [int(k * w / total_w) for w in weights]
        rest = k - sum(counts)
        i = len(vocab) - 1
        while rest > 0:  # the remainder goes to the rarest words, one each
            counts[i] += 1
            rest -= 1
            i = i - 1 if i > 3 else len(vocab) - 1
        return counts

    def build(k: int, fine: int) -> str:
        counts = counts_for(k)
        words = [w for w, c in zip(vocab, counts, strict=True) for _ in range(c)]
        random.Random(f"fwe-{seed}-{k}").shuffle(words)
        return preamble + "... " + " ".join(words) + " ..."

    k, _, context, n_tokens = fit_context(build, tokenizer, length, task, 3.0)
    counts = counts_for(k)
    if not counts[2] > max(counts[3:]):
        raise ValueError(f"context_length={length} is too short for task 'fwe'; ask for at least 256 tokens.")
    return TextExample(
        task=task,
        context=context,
        question=(
            "Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text?"
        ),
        answers=vocab[:3],
        metric="all",
        answer_prefix="According to the coded text above, the three most frequently appeared words are:",
        max_new_tokens=30,
        context_tokens=n_tokens,
        metadata={"counts_top4": counts[:4]},
    )


def _town_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()


def _qa(task: str, tokenizer: Any, length: int, rng: random.Random) -> TextExample:
    names: list[str] = []
    while len(names) < max(64, length // 20):
        name = _town_name(rng)
        if name not in names:
            names.append(name)
    docs: list[dict[str, str]] = []
    for name in names:
        docs.append(
            {
                "name": name,
                "year": str(rng.randint(1450, 1950)),
                "founder": f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}",
                "export": rng.choice(_EXPORTS),
                "river": _town_name(rng),
                "province": _town_name(rng),
                "population": f"{rng.randint(2, 90)},{rng.randint(100, 999)}",
            }
        )
    target, distractors = docs[0], docs[1:]
    depth = rng.random()
    kind = rng.choice(("year", "founder", "export", "river"))

    def render(d: dict[str, str]) -> str:
        return (
            f"{d['name']} is a town in the province of {d['province']}. It was founded in {d['year']} "
            f"by {d['founder']}. The river {d['river']} flows through {d['name']}, and its main export "
            f"is {d['export']}. Today {d['name']} has a population of {d['population']}."
        )

    preamble = "The following are given documents.\n\n"

    def build(k: int, fine: int) -> str:
        k = min(k, len(distractors) - 1)
        bodies = insert_at_depths([render(d) for d in distractors[:k]], [render(target)], [depth])
        if fine > 0:  # the first `fine` words of one more distractor document
            bodies.append(" ".join(render(distractors[k]).split()[:fine]))
        return preamble + "\n\n".join(f"Document {i + 1}:\n{b}" for i, b in enumerate(bodies))

    _, _, context, n_tokens = fit_context(build, tokenizer, length, task, 60.0, lambda k: 30)
    name = target["name"]
    question, answers = {
        "year": (f"In which year was {name} founded?", [target["year"]]),
        "founder": (f"Who founded {name}?", [target["founder"], target["founder"].split()[-1]]),
        "export": (f"What is the main export of {name}?", [target["export"]]),
        "river": (f"Which river flows through {name}?", [target["river"]]),
    }[kind]
    return TextExample(
        task=task,
        context=context,
        question=(
            "Answer the question based on the given documents. Only give me the answer and do not "
            f"output any other words.\n\nQuestion: {question}"
        ),
        answers=answers,
        metric="part",
        answer_prefix="Answer:",
        max_new_tokens=24,
        context_tokens=n_tokens,
        metadata={"document": render(target), "depth": depth, "kind": kind},
    )


# How each needle-in-a-haystack task sets up :func:`_niah`.
_NIAH_SETUPS: dict[str, dict[str, Any]] = {
    "niah_single_1": dict(haystack="noise", value_kind="number", key_kind="word", n_keys=1, n_values=1, n_queries=1),
    "niah_single_2": dict(haystack="docs", value_kind="number", key_kind="word", n_keys=1, n_values=1, n_queries=1),
    "niah_single_3": dict(haystack="docs", value_kind="uuid", key_kind="word", n_keys=1, n_values=1, n_queries=1),
    "niah_multikey_1": dict(haystack="docs", value_kind="number", key_kind="word", n_keys=4, n_values=1, n_queries=1),
    "niah_multikey_2": dict(haystack="needles", value_kind="number", key_kind="word", n_keys=1, n_values=1, n_queries=1),
    "niah_multikey_3": dict(haystack="needles", value_kind="uuid", key_kind="uuid", n_keys=1, n_values=1, n_queries=1),
    "niah_multivalue": dict(haystack="docs", value_kind="number", key_kind="word", n_keys=1, n_values=4, n_queries=1),
    "niah_multiquery": dict(haystack="docs", value_kind="number", key_kind="word", n_keys=4, n_values=1, n_queries=4),
}  # fmt: skip


def make_ruler_example(task: str, tokenizer: Any, length: int, rng: random.Random, seed: int) -> TextExample:
    """Build one example of a task of :data:`RULER_TASKS` (see the module documentation).

    Parameters
    ----------
    task
        The task name.
    tokenizer
        The tokenizer the context length is measured with.
    length
        The context's number of tokens.
    rng
        The example's generator; every random draw comes from it.
    seed
        The example's seed, for the tasks that reshuffle their word list at every size tried.

    Returns
    -------
    TextExample

    Raises
    ------
    ValueError
        If ``task`` is not one of :data:`RULER_TASKS` or ``length`` is too short for it.
    """
    if task in _NIAH_SETUPS:
        return _niah(task, tokenizer, length, rng, **_NIAH_SETUPS[task])
    if task == "vt":
        return _vt(task, tokenizer, length, rng)
    if task == "cwe":
        return _cwe(task, tokenizer, length, rng, seed)
    if task == "fwe":
        return _fwe(task, tokenizer, length, rng, seed)
    if task == "qa":
        return _qa(task, tokenizer, length, rng)
    raise ValueError(f"Unknown RULER task {task!r}; choose one of: {', '.join(RULER_TASKS)}.")
