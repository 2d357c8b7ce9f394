"""Tasks on real text: the Python standard library's own source code.

The context is a run of top-level function definitions taken verbatim (``ast`` source segments)
from a fixed list of pure-Python standard-library modules, shuffled per example; the asked fact is
stated once in it. Every Python install ships this text, so the tasks need no download, and for a
given Python version they are deterministic.

``source_default``
    "What is the default value of the parameter ``p`` of the function ``f``?" - ``f`` is defined once
    in the context and ``p``'s default is a number or a string literal (never ``None``, a boolean, 0,
    1 or -1, which could be guessed). Answer: the default as written in the source.
``source_raises``
    "Which function raises ``E`` with the message '...'?" - the message is a string literal of one
    ``raise`` in the context; the model must find it and walk up to the enclosing definition (two
    hops on real code). Answer: the function's name.

A model trained on code may remember some facts without reading them; the paired comparison of
two presses on the same examples is unaffected, but such examples cannot discriminate. The README
reports the closed-book accuracy measured for the evaluation model.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import random
from dataclasses import dataclass
from typing import Any

from mixkv.eval.haystack import fit_context, insert_at_depths
from mixkv.eval.text_example import TextExample

__all__ = ["SOURCE_TASKS", "make_source_example", "source_functions"]

#: Task names defined here.
SOURCE_TASKS: tuple[str, ...] = ("source_default", "source_raises")

_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "colorsys", "configparser", "csv", "difflib",
    "dis", "fnmatch", "fractions", "ftplib", "getopt", "gettext", "glob", "gzip", "heapq", "imaplib",
    "inspect", "ipaddress", "json.decoder", "json.encoder", "locale", "mailbox", "mimetypes", "netrc",
    "ntpath", "nntplib", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib",
    "poplib", "posixpath", "pprint", "quopri", "random", "reprlib", "sched", "shlex", "shutil",
    "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "urllib.parse", "urllib.request", "uu", "uuid",
    "warnings", "wave", "zipfile",
)  # fmt: skip

_MAX_FUNCTION_CHARS = 2500  # one definition stays a small part of a 2k-token context


@dataclass(frozen=True)
class SourceFunction:
    """A top-level function of a standard-library module, with the facts a question can ask."""

    module: str
    name: str
    source: str
    defaults: tuple[tuple[str, str], ...]  # (parameter, default as written)
    raises: tuple[tuple[str, str], ...]  # (exception name, message literal)


def _literal_default(node: ast.expr, text: str) -> str | None:
    """The default as written, if it is a number or string literal that cannot be guessed."""
    if not isinstance(node, ast.Constant) or isinstance(node.value, bool) or node.value is None:
        return None
    if isinstance(node.value, (int, float)) and node.value not in (0, 1, -1):
        return ast.get_source_segment(text, node)
    if isinstance(node.value, str) and 2 <= len(node.value) <= 30 and node.value.isprintable():
        return ast.get_source_segment(text, node)
    return None


def _raised_messages(fn: ast.FunctionDef) -> list[tuple[str, str]]:
    out = []
    for node in ast.walk(fn):
        if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
            continue
        call = node.exc
        if not (isinstance(call.func, ast.Name) and call.args and isinstance(call.args[0], ast.Constant)):
            continue
        message = call.args[0].value
        if (
            isinstance(message, str)
            and 15 <= len(message) <= 80
            and "%" not in message
            and "{" not in message
        ):
            out.append((call.func.id, message))
    return out


@functools.lru_cache(maxsize=1)
def source_functions() -> tuple[SourceFunction, ...]:
    """Top-level functions of the fixed module list, names unique across it, in a fixed order."""
    found: list[SourceFunction] = []
    for module_name in _MODULES:
        try:
            module = importlib.import_module(module_name)
            text = inspect.getsource(module)
        except (ImportError, OSError, TypeError):  # pragma: no cover - module absent from this build
            continue
        for node in ast.parse(text).body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
                continue
            source = ast.get_source_segment(text, node)
            if source is None or len(source) > _MAX_FUNCTION_CHARS:
                continue
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
            defaults = tuple(
                (arg.arg, value) for arg, d in pairs if (value := _literal_default(d, text)) is not None
            )
            found.append(
                SourceFunction(module_name, node.name, source, defaults, tuple(_raised_messages(node)))
            )
    names = [f.name for f in found]
    messages = [m for f in found for _, m in f.raises]
    unique = []
    for f in found:  # a name (or message) defined twice would make the question ambiguous
        if names.count(f.name) > 1:
            continue
        raises = tuple((e, m) for e, m in f.raises if messages.count(m) == 1)
        unique.append(SourceFunction(f.module, f.name, f.source, f.defaults, raises))
    return tuple(unique)


def make_source_example(task: str, tokenizer: Any, length: int, rng: random.Random) -> TextExample:
    """Build one example of a task of :data:`SOURCE_TASKS` (see the module documentation)."""
    if task not in SOURCE_TASKS:
        raise ValueError(f"Unknown source task {task!r}; choose one of: {', '.join(SOURCE_TASKS)}.")
    functions = list(source_functions())
    # about a third of the context at most (a token is ~3 characters of code), so short contexts fit
    small = [f for f in functions if len(f.source) <= length]
    candidates = [f for f in small if (f.defaults if task == "source_default" else f.raises)]
    if not candidates:
        raise ValueError(
            f"context_length={length} is too short for task {task!r}; ask for at least 1024 tokens."
        )
    target = rng.choice(candidates)
    others = [f for f in functions if f is not target]
    rng.shuffle(others)
    depth = rng.random()
    preamble = "Below are Python functions from the standard library.\n\n"

    def build(k: int, fine: int) -> str:
        units = [f.source for f in others[:k]]
        units = insert_at_depths(units, [target.source], [depth])
        if fine:  # the first `fine` lines of one more function
            units.append("\n".join(others[k].source.splitlines()[:fine]))
        return preamble + "\n\n\n".join(units)

    _, _, context, n_tokens = fit_context(
        build, tokenizer, length, task, 250.0, lambda k: len(others[k].source.splitlines()) - 1
    )
    if task == "source_default":
        parameter, default = rng.choice(target.defaults)
        question = (
            f"In the code above, what is the default value of the parameter `{parameter}` of the "
            f"function `{target.name}`? Answer with the value only."
        )
        answers = [default, default.strip("'\"")]
        prefix = f"The default value of `{parameter}` in `{target.name}` is"
        metadata: dict[str, Any] = {"parameter": parameter}
    else:
        exception, message = rng.choice(target.raises)
        question = (
            f'In the code above, which function raises {exception} with the message "{message}"? '
            "Answer with the function name only."
        )
        answers = [target.name]
        prefix = "The function is"
        metadata = {"exception": exception, "message": message}
    return TextExample(
        task=task,
        context=context,
        question=question,
        answers=answers,
        metric="part",
        answer_prefix=prefix,
        max_new_tokens=16,
        context_tokens=n_tokens,
        metadata={**metadata, "module": target.module, "function": target.name, "depth": depth},
    )
