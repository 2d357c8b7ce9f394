"""``mixkv lm-eval ARGS``: lm-evaluation-harness with the ``mixkv`` model type (extra ``lm-eval``)."""

from __future__ import annotations

from collections.abc import Sequence

from mixkv.harnesses.harness_cli import run_harness_cli


def main(argv: Sequence[str] | None = None) -> int:
    """``mixkv lm-eval ARGS``: the harness's command line with the ``mixkv`` model type registered.

    Exits 1 when an evaluation raised or produced no results."""
    import lm_eval
    from lm_eval.__main__ import cli_evaluate

    import mixkv.harnesses.lm_eval_model  # noqa: F401  (registers model type mixkv)

    return run_harness_cli("lm-eval", cli_evaluate, argv, watched=(lm_eval, "simple_evaluate"))
