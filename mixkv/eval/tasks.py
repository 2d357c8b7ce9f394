"""The text tasks of ``mixkv eval``: their names and seeded generation.

Every task builds a context of a requested length (counted in tokens of the tokenizer under test,
within 5 %), a question and the expected answer strings (a
:class:`~mixkv.eval.text_example.TextExample`). The families:

* needles, variable tracking, word frequencies and QA after RULER (``niah_*``, ``vt``, ``cwe``,
  ``fwe``, ``qa``): :mod:`mixkv.eval.ruler_tasks`;
* coverage tasks (list every item of a kind, count, two-hop chains: ``agg_list``, ``agg_count``,
  ``multihop``): :mod:`mixkv.eval.coverage_tasks`;
* facts stated once in real standard-library source code (``source_default``,
  ``source_raises``): :mod:`mixkv.eval.source_tasks`.

They share the haystacks and the length fitting of :mod:`mixkv.eval.haystack`.
"""

from __future__ import annotations

import random
from typing import Any

from mixkv.eval.coverage_tasks import COVERAGE_TASKS, make_coverage_example
from mixkv.eval.ruler_tasks import RULER_TASKS, make_ruler_example
from mixkv.eval.source_tasks import SOURCE_TASKS, make_source_example
from mixkv.eval.text_example import TextExample

__all__ = ["TASKS", "make_examples"]

#: Names accepted by :func:`make_examples`.
TASKS: tuple[str, ...] = (*RULER_TASKS, *COVERAGE_TASKS, *SOURCE_TASKS)


def _make_one(task: str, tokenizer: Any, length: int, rng: random.Random, seed: int) -> TextExample:
    if task in RULER_TASKS:
        return make_ruler_example(task, tokenizer, length, rng, seed)
    if task in COVERAGE_TASKS:
        return make_coverage_example(task, tokenizer, length, rng)
    return make_source_example(task, tokenizer, length, rng)


def make_examples(task: str, tokenizer: Any, context_length: int, n: int, seed: int = 0) -> list[TextExample]:
    """Generate ``n`` seeded examples of a task with contexts of ``context_length`` tokens.

    Parameters
    ----------
    task
        One of :data:`TASKS`.
    tokenizer
        A Hugging Face tokenizer (callable returning ``input_ids``); lengths are measured with it.
    context_length
        Target number of tokens of each example's ``context`` (met within 5 %).
    n
        Number of examples.
    seed
        Seed; the same seed, tokenizer and Python version give the same examples.

    Returns
    -------
    list of TextExample

    Raises
    ------
    ValueError
        If ``task`` is unknown (the message lists the tasks), ``n`` or ``context_length`` is not
        positive, or ``context_length`` is too short for the task.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of: {', '.join(TASKS)}.")
    if n < 1:
        raise ValueError(f"n must be a positive number of examples, got {n}.")
    if context_length < 16:
        raise ValueError(f"context_length must be at least 16 tokens, got {context_length}.")
    examples = []
    for i in range(n):
        rng = random.Random(f"mixkv-{task}-{context_length}-{seed}-{i}")
        examples.append(_make_one(task, tokenizer, context_length, rng, seed * 100_003 + i))
    return examples
