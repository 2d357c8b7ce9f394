"""Building blocks of the generated text tasks: haystacks, keys and values, length fitting.

A task's context is a haystack (noise sentences, prose sentences of standard-library docstrings,
or units of the task's own) with the task's items inserted at relative depths, grown unit by unit
until it measures the requested number of tokens of the tokenizer under test
(:func:`fit_context`, within :data:`LENGTH_TOLERANCE`).

The docstring haystack is read with :func:`inspect.getdoc` from a fixed list of standard-library
modules in a fixed order, so it is deterministic for a given Python version.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "LENGTH_TOLERANCE",
    "corpus_words",
    "count_tokens",
    "docs_max_fine",
    "fit_context",
    "haystack_units",
    "insert_at_depths",
    "noise_filler",
    "random_number",
    "random_uuid",
    "stdlib_sentences",
    "word_keys",
]

#: How far the measured context length may be from the requested one (relative).
LENGTH_TOLERANCE = 0.05


def count_tokens(tokenizer: Any, text: str) -> int:
    """Return the number of tokens ``tokenizer`` produces for ``text`` (no special tokens)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------
# Haystacks and vocabularies

_NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

_STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "email.message", "enum", "filecmp", "fileinput",
    "fnmatch", "fractions", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html.parser", "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools",
    "json", "locale", "logging", "lzma", "mailbox", "math", "mimetypes", "netrc", "numbers",
    "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "poplib", "pprint",
    "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time",
    "timeit", "token", "tokenize", "trace", "traceback", "types", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "zipfile", "zlib",
)  # fmt: skip

_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly",
    "keen", "lively", "mellow", "nimble", "odd", "proud", "quiet", "rapid", "silent", "tidy",
    "upbeat", "vivid", "witty", "young", "zesty", "bold", "crisp", "dry", "early", "fuzzy",
    "grand", "humble", "lean", "mighty", "narrow", "plain", "rough", "shy", "tall", "warm",
    "ancient", "bright", "clever", "damp", "empty", "fancy", "giant", "hasty", "loyal", "modest",
)  # fmt: skip

_NOUNS = (
    "otter", "falcon", "maple", "harbor", "lantern", "meadow", "pebble", "river", "saddle", "tiger",
    "violin", "willow", "anchor", "beacon", "canyon", "dragon", "ember", "forest", "glacier",
    "hammer", "island", "jacket", "kettle", "ladder", "mirror", "needle", "orchard", "pepper",
    "quarry", "rocket", "shadow", "thistle", "umbrella", "valley", "walnut", "yacht", "zebra",
    "badger", "cobalt", "dolphin", "engine", "feather", "garden", "helmet", "igloo", "jungle",
    "koala", "lemon", "magnet", "nectar",
)  # fmt: skip


def _clean_paragraph(text: str) -> str | None:
    lines = text.splitlines()
    if any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
        return None  # code or indented listing
    flat = " ".join(line.strip() for line in lines).strip()
    if len(flat) < 40 or not flat[0].isupper():
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in flat)
    if letters < 0.85 * len(flat):
        return None
    return flat


@functools.lru_cache(maxsize=1)
def stdlib_sentences() -> tuple[str, ...]:
    """Return prose sentences taken from standard-library docstrings, in a fixed order.

    Returns
    -------
    tuple of str
        Deduplicated sentences (4 to 60 words, ending with a full stop) from the module docstrings
        and public members of a fixed list of standard-library modules, members sorted by name.
    """
    seen: set[str] = set()
    out: list[str] = []
    for name in _STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - e.g. sqlite3 missing from a minimal build
            continue
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. deprecated aliases such as typing.re
                obj = getattr(module, attr, None)
                public = inspect.isclass(obj) or inspect.isfunction(obj)
                if public and getattr(obj, "__module__", "") == name:
                    docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            for paragraph in doc.split("\n\n"):
                flat = _clean_paragraph(paragraph)
                if flat is None:
                    continue
                for sentence in re.split(r"(?<=[.!?])\s+", flat):
                    words = sentence.split()
                    if 4 <= len(words) <= 60 and sentence.endswith(".") and sentence not in seen:
                        seen.add(sentence)
                        out.append(sentence)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    """Distinct lowercase words (4-10 letters) of the docstring corpus, in order of appearance."""
    seen: set[str] = set()
    words: list[str] = []
    for sentence in stdlib_sentences():
        for word in re.findall(r"[A-Za-z]+", sentence):
            low = word.lower()
            if 4 <= len(low) <= 10 and low == word and low not in seen:
                seen.add(low)
                words.append(low)
    return tuple(words)


def word_keys(rng: random.Random, n: int, exclude: set[str] | None = None) -> list[str]:
    """Draw ``n`` distinct ``adjective-noun`` keys (needle keys such as ``"amber-otter"``).

    Parameters
    ----------
    rng
        The example's generator (one shuffle of the adjective-noun pairs).
    n
        Number of keys; beyond the 2,500 pairs, keys get a third word and a number.
    exclude
        Keys not to draw (those already used by the example).

    Returns
    -------
    list of str
    """
    exclude = exclude or set()
    pool = [f"{a}-{b}" for a in _ADJECTIVES for b in _NOUNS]
    rng.shuffle(pool)
    keys = [k for k in pool if k not in exclude][:n]
    extra = 0
    while len(keys) < n:  # more keys than adjective-noun pairs: add a third word
        a, b, c = _ADJECTIVES[extra % 50], _NOUNS[(extra // 50) % 50], _NOUNS[extra % 50]
        keys.append(f"{a}-{b}-{c}-{extra}")
        extra += 1
    return keys


def random_number(rng: random.Random) -> str:
    """A 7-digit number as text, the value of a numeric needle."""
    return str(rng.randint(1_000_000, 9_999_999))


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID drawn from ``rng`` (128 random bits), as text."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


# --------------------------------------------------------------------------------------------
# Length fitting


def fit_context(
    build: Callable[[int, int], str],
    tokenizer: Any,
    target: int,
    task: str,
    tokens_per_unit_hint: float,
    max_fine: Callable[[int], int] = lambda k: 0,
) -> tuple[int, int, str, int]:
    """Choose the haystack size whose context is closest to ``target`` tokens.

    Parameters
    ----------
    build
        ``build(k, fine)`` renders a context from ``k`` whole haystack units plus ``fine`` small
        filler pieces (``0 <= fine <= max_fine(k)``, e.g. words of the next sentence); token counts
        grow with both.
    tokenizer
        The tokenizer the length is measured with.
    target
        The requested number of tokens.
    task
        Task name, for the error messages.
    tokens_per_unit_hint
        About how many tokens one unit takes: where the search for ``k`` starts.
    max_fine
        The largest ``fine`` for a given ``k``.

    Returns
    -------
    tuple
        ``(k, fine, text, tokens)`` of the context closest to ``target``.

    Raises
    ------
    ValueError
        If the smallest context is already too long, the haystack runs out, or no context lies
        within :data:`LENGTH_TOLERANCE` of ``target``.
    """

    def count(k: int, fine: int = 0) -> int:
        return count_tokens(tokenizer, build(k, fine))

    smallest = count(0)
    if smallest > target * (1 + LENGTH_TOLERANCE):
        raise ValueError(
            f"context_length={target} is too short for task {task!r}: its instruction and needles "
            f"alone take {smallest} tokens; ask for at least {int(smallest * 1.1) + 1} tokens."
        )
    lo, hi = 0, max(1, int(2 * target / max(tokens_per_unit_hint, 0.5)) + 8)
    while count(hi) < target:
        if hi > 64 * target:
            raise ValueError(
                f"Could not build a {task!r} context of {target} tokens: the generated haystack is "
                "exhausted; ask for a shorter context."
            )
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # largest k with count(k) <= target
        mid = (lo + hi) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid
    k = lo
    f_lo, f_hi = 0, max_fine(k) + 1  # largest fine with count(k, fine) <= target
    while f_hi - f_lo > 1:
        mid = (f_lo + f_hi) // 2
        if count(k, mid) <= target:
            f_lo = mid
        else:
            f_hi = mid
    candidates = [(k, f_lo)]
    if f_lo + 1 <= max_fine(k):
        candidates.append((k, f_lo + 1))
    candidates.append((hi, 0))
    best: tuple[int, int, str, int] | None = None
    for ck, cf in candidates:
        text = build(ck, cf)
        n = count_tokens(tokenizer, text)
        if best is None or abs(n - target) < abs(best[3] - target):
            best = (ck, cf, text, n)
    assert best is not None
    if abs(best[3] - target) > LENGTH_TOLERANCE * target:
        raise ValueError(
            f"Could not build a {task!r} context of {target} tokens within 5 % (closest: {best[3]}); "
            "ask for a longer context."
        )
    return best


def insert_at_depths(units: list[str], items: Sequence[str], depths: Sequence[float]) -> list[str]:
    """A copy of ``units`` with ``items`` inserted at relative depths (0 = start, 1 = end)."""
    out = list(units)
    order = sorted(range(len(items)), key=lambda i: depths[i], reverse=True)
    for i in order:  # from the deepest, so earlier positions stay valid
        pos = round(depths[i] * len(units))
        out.insert(pos, items[i])
    return out


def haystack_units(kind: str, k: int, offset: int, fine: int = 0) -> list[str]:
    """``k`` haystack sentences of ``kind`` (``"noise"`` or ``"docs"``).

    ``fine`` adds that many words of the next sentence (docs) or that many extra noise sentences
    (noise). The docs haystack starts at sentence ``offset`` of :func:`stdlib_sentences` and wraps
    around.
    """
    if kind == "noise":
        return [_NOISE_SENTENCES[i % len(_NOISE_SENTENCES)] for i in range(k + fine)]
    corpus = stdlib_sentences()
    units = [corpus[(offset + i) % len(corpus)] for i in range(k)]
    if fine > 0:
        units.append(" ".join(corpus[(offset + k) % len(corpus)].split()[:fine]))
    return units


def docs_max_fine(offset: int) -> Callable[[int], int]:
    """``max_fine`` of :func:`fit_context` for the docs haystack starting at ``offset``: all but
    the last word of the sentence after the ``k`` whole ones."""
    corpus = stdlib_sentences()
    return lambda k: len(corpus[(offset + k) % len(corpus)].split()) - 1


def noise_filler(fine: int) -> str:
    """``fine`` noise sentences, each preceded by a space (tops up a context after its last unit)."""
    return "".join(" " + _NOISE_SENTENCES[i % len(_NOISE_SENTENCES)] for i in range(fine))
