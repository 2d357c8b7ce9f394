"""RULER-style long-context text tasks, generated offline and seeded.

Every task builds a context of a requested length (counted in tokens of the tokenizer under test,
within 5 %), a question and the expected answer strings. Scoring follows RULER's string match:
``"all"`` is the fraction of expected strings found in the output (case-insensitive), ``"part"``
is 1 if any expected string is found.

Tasks
-----
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
``agg_list``, ``agg_count``, ``multihop``
    Coverage tasks (list every item of a kind, count, two-hop chains): see
    :mod:`mixkv.eval.coverage_tasks`.
``source_default``, ``source_raises``
    Facts stated once in real standard-library source code: see :mod:`mixkv.eval.source_tasks`.

The docstring haystack is read with :func:`inspect.getdoc` from a fixed list of standard-library
modules in a fixed order, so it is deterministic for a given Python version.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import random
import re
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TASKS",
    "TextExample",
    "count_tokens",
    "encode_prompt",
    "make_examples",
    "score_output",
    "stdlib_sentences",
]

#: How far the measured context length may be from the requested one (relative).
LENGTH_TOLERANCE = 0.05


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


# --------------------------------------------------------------------------------------------
# Tokens and scoring


def count_tokens(tokenizer: Any, text: str) -> int:
    """Return the number of tokens ``tokenizer`` produces for ``text`` (no special tokens)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


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
def _corpus_words() -> tuple[str, ...]:
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


def _word_keys(rng: random.Random, n: int, exclude: set[str] | None = None) -> list[str]:
    """Draw ``n`` distinct ``adjective-noun`` keys."""
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


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


# --------------------------------------------------------------------------------------------
# Length fitting


def _fit(
    build: Callable[[int, int], str],
    tokenizer: Any,
    target: int,
    task: str,
    tokens_per_unit_hint: float,
    max_fine: Callable[[int], int] = lambda k: 0,
) -> tuple[int, int, str, int]:
    """Choose the haystack size whose context is closest to ``target`` tokens.

    ``build(k, fine)`` renders a context from ``k`` whole haystack units plus ``fine`` small filler
    pieces (``0 <= fine <= max_fine(k)``, e.g. words of the next sentence); token counts grow with
    both. Returns ``(k, fine, text, tokens)``.
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


def _insert(units: list[str], items: Sequence[str], depths: Sequence[float]) -> list[str]:
    """Insert ``items`` into ``units`` at relative depths (0 = start, 1 = end)."""
    out = list(units)
    order = sorted(range(len(items)), key=lambda i: depths[i], reverse=True)
    for i in order:  # from the deepest, so earlier positions stay valid
        pos = round(depths[i] * len(units))
        out.insert(pos, items[i])
    return out


def _haystack_units(kind: str, k: int, offset: int, fine: int = 0) -> list[str]:
    """``k`` haystack sentences; ``fine`` adds that many words of the next sentence (docs) or
    that many extra noise sentences (noise)."""
    if kind == "noise":
        return [_NOISE_SENTENCES[i % len(_NOISE_SENTENCES)] for i in range(k + fine)]
    corpus = stdlib_sentences()
    units = [corpus[(offset + i) % len(corpus)] for i in range(k)]
    if fine > 0:
        units.append(" ".join(corpus[(offset + k) % len(corpus)].split()[:fine]))
    return units


def _docs_fine(offset: int) -> Callable[[int], int]:
    corpus = stdlib_sentences()
    return lambda k: len(corpus[(offset + k) % len(corpus)].split()) - 1


def _noise_filler(fine: int) -> str:
    return "".join(" " + _NOISE_SENTENCES[i % len(_NOISE_SENTENCES)] for i in range(fine))


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
    draw_value = _number if value_kind == "number" else _uuid
    keys = [_uuid(rng) for _ in range(n_keys)] if key_kind == "uuid" else _word_keys(rng, n_keys)
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
            distractor_keys = [_uuid(rng) for _ in range(min(n_distractors, length))]
        else:
            distractor_keys = _word_keys(rng, min(n_distractors, length), exclude=set(keys))
        distractor_vals = [draw_value(rng) for _ in distractor_keys]
    preamble = _NIAH_PREAMBLE.format(kind=noun)

    def build(k: int, fine: int) -> str:
        if haystack == "needles":
            k = min(k, len(distractor_keys))
            units = [
                f"One of the special magic {noun} for {dk} is: {dv}."
                for dk, dv in zip(distractor_keys[:k], distractor_vals[:k], strict=True)
            ]
            return preamble + " ".join(_insert(units, needles, depths)) + _noise_filler(fine)
        units = _haystack_units(haystack, k, offset, fine)
        # needles go between whole sentences, never inside the partial last one
        n_whole = k
        body = _insert(units[:n_whole], needles, depths) + units[n_whole:]
        return preamble + " ".join(body)

    if haystack == "needles":
        hint, fine_max = 25.0, (lambda k: 12)
    elif haystack == "docs":
        hint, fine_max = 25.0, _docs_fine(offset)
    else:
        hint, fine_max = 5.0, (lambda k: 0)
    _, _, context, n_tokens = _fit(build, tokenizer, length, task, hint, fine_max)
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
        return preamble + " ".join(_insert(_haystack_units("noise", k, 0), statements, depths))

    _, _, context, n_tokens = _fit(build, tokenizer, length, task, 5.0)
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
    vocab = list(_corpus_words())
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
    _, _, context, n_tokens = _fit(build, tokenizer, length, task, 5.0 * freq_uncommon, fine_max)
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

    k, _, context, n_tokens = _fit(build, tokenizer, length, task, 3.0)
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
        bodies = _insert([render(d) for d in distractors[:k]], [render(target)], [depth])
        if fine > 0:  # the first `fine` words of one more distractor document
            bodies.append(" ".join(render(distractors[k]).split()[:fine]))
        return preamble + "\n\n".join(f"Document {i + 1}:\n{b}" for i, b in enumerate(bodies))

    _, _, context, n_tokens = _fit(build, tokenizer, length, task, 60.0, lambda k: 30)
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


def _make_one(task: str, tokenizer: Any, length: int, rng: random.Random, seed: int) -> TextExample:
    if task == "niah_single_1":
        return _niah(task, tokenizer, length, rng, haystack="noise", value_kind="number",
                     key_kind="word", n_keys=1, n_values=1, n_queries=1)  # fmt: skip
    if task == "niah_single_2":
        return _niah(task, tokenizer, length, rng, haystack="docs", value_kind="number",
                     key_kind="word", n_keys=1, n_values=1, n_queries=1)  # fmt: skip
    if task == "niah_single_3":
        return _niah(task, tokenizer, length, rng, haystack="docs", value_kind="uuid",
                     key_kind="word", n_keys=1, n_values=1, n_queries=1)  # fmt: skip
    if task == "niah_multikey_1":
        return _niah(task, tokenizer, length, rng, haystack="docs", value_kind="number",
                     key_kind="word", n_keys=4, n_values=1, n_queries=1)  # fmt: skip
    if task == "niah_multikey_2":
        return _niah(task, tokenizer, length, rng, haystack="needles", value_kind="number",
                     key_kind="word", n_keys=1, n_values=1, n_queries=1)  # fmt: skip
    if task == "niah_multikey_3":
        return _niah(task, tokenizer, length, rng, haystack="needles", value_kind="uuid",
                     key_kind="uuid", n_keys=1, n_values=1, n_queries=1)  # fmt: skip
    if task == "niah_multivalue":
        return _niah(task, tokenizer, length, rng, haystack="docs", value_kind="number",
                     key_kind="word", n_keys=1, n_values=4, n_queries=1)  # fmt: skip
    if task == "niah_multiquery":
        return _niah(task, tokenizer, length, rng, haystack="docs", value_kind="number",
                     key_kind="word", n_keys=4, n_values=1, n_queries=4)  # fmt: skip
    if task == "vt":
        return _vt(task, tokenizer, length, rng)
    if task == "cwe":
        return _cwe(task, tokenizer, length, rng, seed)
    if task == "fwe":
        return _fwe(task, tokenizer, length, rng, seed)
    if task == "qa":
        return _qa(task, tokenizer, length, rng)
    from mixkv.eval.coverage_tasks import COVERAGE_TASKS, make_coverage_example
    from mixkv.eval.source_tasks import make_source_example

    if task in COVERAGE_TASKS:
        return make_coverage_example(task, tokenizer, length, rng)
    return make_source_example(task, tokenizer, length, rng)


#: Names accepted by :func:`make_examples`.
TASKS: tuple[str, ...] = (
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
    # beyond needles: coverage (mixkv.eval.coverage_tasks) and real source code (mixkv.eval.source_tasks)
    "agg_list",
    "agg_count",
    "multihop",
    "source_default",
    "source_raises",
)


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


# --------------------------------------------------------------------------------------------
# Prompt encoding


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
