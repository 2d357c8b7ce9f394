"""Coverage tasks: answers that need several places of the context, not one needle.

Retrieval of a single needle rewards a press that keeps the few tokens the question points at;
these tasks reward one that keeps the context *covered* (the MixKV paper's gains are on
summary-like and multi-document tasks). All are generated offline and seeded, in the
standard-library prose haystack of :mod:`mixkv.eval.haystack`, and fitted to the requested length.

``agg_list``
    Warehouse log entries are spread over the context: four deliveries of fruit and four rounds of
    the night guard; the question asks for every fruit delivered. Metric ``"all"`` (recall).
``agg_count``
    Visits of several people to the archive are spread over the context; the question asks how many
    times one of them came (2-4 times). The answer is that number as a word-bounded match.
``multihop``
    Two hops: "The code for the <key> vault is kept in locker <L>." and, elsewhere, "Locker <L>
    holds the number <N>."; the question asks for the number of the locker holding the key's code.
    One distractor chain (another vault, its locker and number) uses the same wording: with two,
    Qwen2.5-Coder-0.5B's full cache answered half of the 2k-token examples, with one 9 of 10.
"""

from __future__ import annotations

import random
from typing import Any

from mixkv.eval.haystack import (
    docs_max_fine,
    fit_context,
    haystack_units,
    insert_at_depths,
    random_number,
    stdlib_sentences,
    word_keys,
)
from mixkv.eval.text_example import TextExample

__all__ = ["COVERAGE_TASKS", "make_coverage_example"]

#: Task names defined here.
COVERAGE_TASKS: tuple[str, ...] = ("agg_list", "agg_count", "multihop")

_FRUITS = (
    "apricots", "bananas", "cherries", "mangoes", "peaches", "plums", "pears", "grapes", "lemons",
    "oranges", "figs", "melons", "limes", "dates", "quinces", "papayas",
)  # fmt: skip
_VISITORS = (
    "Ada Moss", "Bruno Hale", "Clara Voss", "Dmitri Lane", "Elena Roth", "Farid Okoye", "Greta Lind",
    "Hector Vale", "Ingrid Salo", "Jonas Brandt",
)  # fmt: skip
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def _spread(rng: random.Random, n: int) -> list[float]:
    """``n`` depths spread over the whole context: one uniform draw in each of ``n`` equal slices."""
    return [(i + rng.random()) / n for i in range(n)]


def _in_docs(
    task: str,
    tokenizer: Any,
    length: int,
    rng: random.Random,
    preamble: str,
    items: list[str],
    depths: list[float],
) -> tuple[str, int]:
    """Insert ``items`` at ``depths`` into a prose haystack fitted to ``length`` tokens."""
    offset = rng.randrange(len(stdlib_sentences()))

    def build(k: int, fine: int) -> str:
        units = haystack_units("docs", k, offset, fine)
        return preamble + " ".join(insert_at_depths(units[:k], items, depths) + units[k:])

    _, _, context, n_tokens = fit_context(build, tokenizer, length, task, 25.0, docs_max_fine(offset))
    return context, n_tokens


def _agg_list(task: str, tokenizer: Any, length: int, rng: random.Random) -> TextExample:
    fruits = rng.sample(_FRUITS, 4)
    gates = rng.sample(range(2, 40), 4)
    notes = [f"Warehouse log: a crate of {fruit} was delivered today." for fruit in fruits]
    notes += [f"Warehouse log: the night guard checked gate {gate}." for gate in gates]
    rng.shuffle(notes)
    depths = _spread(rng, len(notes))
    preamble = "The following text contains warehouse log entries. Keep track of them.\n"
    context, n_tokens = _in_docs(task, tokenizer, length, rng, preamble, notes, depths)
    return TextExample(
        task=task,
        context=context,
        question="Which fruits were delivered to the warehouse according to the log entries? List every one.",
        answers=fruits,
        metric="all",
        answer_prefix="The fruits delivered to the warehouse were:",
        max_new_tokens=40,
        context_tokens=n_tokens,
        metadata={"fruits": fruits, "gates": gates, "notes": notes, "depths": depths},
    )


def _agg_count(task: str, tokenizer: Any, length: int, rng: random.Random) -> TextExample:
    people = rng.sample(_VISITORS, 3)
    counts = [rng.randint(2, 4) for _ in people]
    asked, times = people[0], counts[0]
    notes = [
        f"Visitor book: {p} came to the archive."
        for p, c in zip(people, counts, strict=True)
        for _ in range(c)
    ]
    rng.shuffle(notes)
    depths = _spread(rng, len(notes))
    preamble = "The following text contains entries of the archive's visitor book. Keep track of them.\n"
    context, n_tokens = _in_docs(task, tokenizer, length, rng, preamble, notes, depths)
    return TextExample(
        task=task,
        context=context,
        question=f"How many times did {asked} come to the archive according to the visitor book? Answer with a number.",
        answers=[str(times), _NUMBER_WORDS[times]],
        metric="word",
        answer_prefix=f"{asked} came to the archive",
        max_new_tokens=8,
        context_tokens=n_tokens,
        metadata={"people": people, "counts": counts, "depths": depths},
    )


def _multihop(task: str, tokenizer: Any, length: int, rng: random.Random) -> TextExample:
    keys = word_keys(rng, 2)  # the asked chain and one distractor
    lockers = rng.sample(range(10, 100), len(keys))
    numbers = [random_number(rng) for _ in keys]
    first = [
        f"The code for the {k} vault is kept in locker {lk}." for k, lk in zip(keys, lockers, strict=True)
    ]
    second = [f"Locker {lk} holds the number {n}." for lk, n in zip(lockers, numbers, strict=True)]
    items = first + second
    depths = [rng.random() for _ in items]
    preamble = "The following text contains notes about vaults and lockers. Keep track of them.\n"
    context, n_tokens = _in_docs(task, tokenizer, length, rng, preamble, items, depths)
    return TextExample(
        task=task,
        context=context,
        question=(
            f"Which number is held by the locker where the code for the {keys[0]} vault is kept? "
            "Answer as: Locker <number of the locker> holds the number <the number>."
        ),
        answers=[numbers[0]],
        metric="all",
        answer_prefix="Locker",  # first hop, then the second note's wording (a prefix ending after the
        # first hop makes this model stop there)
        max_new_tokens=32,
        context_tokens=n_tokens,
        metadata={"keys": keys, "lockers": lockers, "numbers": numbers, "depths": depths},
    )


def make_coverage_example(task: str, tokenizer: Any, length: int, rng: random.Random) -> TextExample:
    """Build one example of a task of :data:`COVERAGE_TASKS` (see the module documentation)."""
    if task == "agg_list":
        return _agg_list(task, tokenizer, length, rng)
    if task == "agg_count":
        return _agg_count(task, tokenizer, length, rng)
    if task == "multihop":
        return _multihop(task, tokenizer, length, rng)
    raise ValueError(f"Unknown coverage task {task!r}; choose one of: {', '.join(COVERAGE_TASKS)}.")
