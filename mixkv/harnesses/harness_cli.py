"""The ``mixkv lm-eval`` / ``mixkv lmms-eval`` wrapper: a harness's own command line, with an exit
status that says whether the evaluation produced results.

lmms-eval's command line catches every exception of an evaluation, logs it and returns normally
(exit status 0); lm-evaluation-harness raises, but returns normally too when an evaluation gives no
results. The wrapper watches the function that runs one evaluation (lmms-eval's
``cli_evaluate_single``, lm-evaluation-harness's ``simple_evaluate``) while the command line runs:
an exception raised through it, or a run that returned no results on the main process, makes the
command exit 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

__all__ = ["EvaluationWatch", "run_harness_cli"]


@dataclass
class EvaluationWatch:
    """What the watched evaluation function did during one command line run."""

    runs: int = 0
    errors: list[BaseException] = field(default_factory=list)
    without_results: int = 0

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.without_results)

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` recording its exceptions and its runs without results."""

        def watched(*args: Any, **kwargs: Any) -> Any:
            self.runs += 1
            try:
                out = function(*args, **kwargs)
            except Exception as exc:
                self.errors.append(exc)
                raise
            if not _has_results(out) and _is_main_process():
                self.without_results += 1
            return out

        return watched

    def message(self, program: str) -> str:
        """Why the command failed, for the error stream."""
        if self.errors:
            reasons = "; ".join(f"{type(e).__name__}: {e}" for e in self.errors)
            return f"mixkv {program}: the evaluation failed ({reasons})."
        return f"mixkv {program}: {self.without_results} evaluation run(s) produced no results."


def run_harness_cli(
    program: str,
    cli_evaluate: Callable[[], Any],
    argv: Sequence[str] | None,
    watched: tuple[ModuleType, str] | None = None,
) -> int:
    """Run a harness's command line (which reads ``sys.argv``) with ``argv``, restoring ``sys.argv``.

    Parameters
    ----------
    program
        The harness's program name (``sys.argv[0]`` while it runs).
    cli_evaluate
        The harness's command-line function.
    argv
        The arguments (default: this process's).
    watched
        ``(module, name)`` of the function that runs one evaluation, looked up by the command line
        at call time; it is wrapped while the command line runs (see the module documentation).

    Returns
    -------
    int
        0, or 1 when an evaluation raised or gave no results (the reason goes to stderr).
    """
    watch = EvaluationWatch()
    restore = _watch(watched, watch) if watched is not None else None
    saved = sys.argv
    sys.argv = [program, *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
        if restore is not None:
            restore()
    if watch.failed:
        print(watch.message(program), file=sys.stderr)
        return 1
    return 0


def _watch(watched: tuple[ModuleType, str], watch: EvaluationWatch) -> Callable[[], None]:
    """Replace ``module.name`` by its watched form; return what puts the original back."""
    module, name = watched
    had_own = name in vars(module)
    original = getattr(module, name)
    setattr(module, name, watch.wrap(original))

    def restore() -> None:
        if had_own:
            setattr(module, name, original)
        else:  # a lazily provided attribute (the module's __getattr__)
            delattr(module, name)

    return restore


def _has_results(out: Any) -> bool:
    """Whether an evaluation's return value holds results (lmms-eval's ``cli_evaluate_single``
    returns ``(results, samples)``, ``simple_evaluate`` the results or None)."""
    if isinstance(out, tuple):
        out = out[0] if out else None
    return isinstance(out, dict) and bool(out.get("results"))


def _is_main_process() -> bool:
    """Rank 0 of a distributed run, or a single process (other ranks return no results)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True
