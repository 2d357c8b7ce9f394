"""One generated long-context text example: what it holds, how its prompt is encoded, how an
answer is scored.

Scoring follows RULER's string match: ``"all"`` is the fraction of expected strings found in the
output (case-insensitive), ``"part"`` is 1 if any expected string is found, ``"word"`` is 1 if any
occurs as a whole word.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TextExample", "encode_prompt", "score_output"]


@dataclass(frozen=True)
class TextExample:
    """One generated long-context example.

    Attributes
    ----------
    task
        Task name.
    context
        The long context (task instruction followed by the haystack); this is what gets compressed.
    question
        The question asked about the context.
    answers
        Expected strings.
    metric
        ``"all"`` (recall of all expected strings) or ``"part"`` (any expected string).
    answer_prefix
        Text that starts the model's answer (RULER style), appended after the generation prompt.
    max_new_tokens
        Generation length suited to the task.
    context_tokens
        Number of tokens of ``context`` for the tokenizer it was built with.
    metadata
        Task details (needle depths, keys, ...), JSON serialisable.
    """

    task: str
    context: str
    question: str
    answers: list[str]
    metric: str
    answer_prefix: str = ""
    max_new_tokens: int = 32
    context_tokens: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """SHA-1 of everything that defines the example's prompt, answers and scoring; a checkpointed
        result is reused only for an example with the same digest."""
        parts = [self.context, self.question, self.answer_prefix, self.metric, *self.answers]
        return hashlib.sha1("\x00".join([*parts, str(self.max_new_tokens)]).encode()).hexdigest()


def score_output(output: str, answers: Sequence[str], metric: str) -> float:
    """Score a model output with RULER's string-match metrics.

    Parameters
    ----------
    output
        The generated text.
    answers
        Expected strings.
    metric
        ``"all"``: fraction of ``answers`` contained in ``output``; ``"part"``: 1.0 if any is;
        ``"word"``: 1.0 if any occurs as a whole word (so "3" does not match "13"). Matching is
        case-insensitive.

    Returns
    -------
    float
        A score in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``metric`` is unknown or ``answers`` is empty.
    """
    if not answers:
        raise ValueError("answers must hold at least one expected string.")
    low = output.lower()
    hits = [a.lower() in low for a in answers]
    if metric == "all":
        return sum(hits) / len(hits)
    if metric == "part":
        return 1.0 if any(hits) else 0.0
    if metric == "word":
        return 1.0 if any(re.search(rf"\b{re.escape(a.lower())}\b", low) for a in answers) else 0.0
    raise ValueError(f"Unknown metric {metric!r}; use 'all', 'part' or 'word'.")


def encode_prompt(
    example: TextExample, tokenizer: Any, *, use_chat_template: bool | None = None
) -> tuple[list[int], list[int]]:
    """Encode an example into the context part and the question part of one prompt.

    The full prompt is ``context_ids + question_ids``. With a chat template (used when the tokenizer
    has one, unless ``use_chat_template`` is False) the user turn holds the context then the
    question, and the answer prefix follows the generation prompt. The split lies right before the
    question, so the context part can be prefilled and compressed before the question is known.

    Parameters
    ----------
    example
        The example.
    tokenizer
        The tokenizer.
    use_chat_template
        Force (True) or disable (False) the chat template; default: use it when present.

    Returns
    -------
    tuple of list of int
        ``(context_ids, question_ids)``.

    Raises
    ------
    ValueError
        If ``use_chat_template`` is True but the tokenizer has no chat template.
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat template.")
    use = has_template if use_chat_template is None else use_chat_template
    question_block = example.question
    if use:
        messages = [{"role": "user", "content": f"{example.context}\n\n{question_block}"}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(rendered, str):  # pragma: no cover - defensive
            raise ValueError("The tokenizer's chat template did not render to a string.")
        split = rendered.rfind(question_block)
        if split < 0:  # pragma: no cover - a template that rewrites the message content
            raise ValueError("The chat template altered the question text; pass use_chat_template=False.")
        head, tail = rendered[:split], rendered[split:]
        if example.answer_prefix:
            tail = tail + example.answer_prefix
        context_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        question_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    else:
        head = f"{example.context}\n\n"
        tail = f"{question_block}\nAnswer:"
        if example.answer_prefix:
            tail = f"{tail} {example.answer_prefix}"
        context_ids = tokenizer(head, add_special_tokens=True)["input_ids"]
        question_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    return list(context_ids), list(question_ids)
