"""``mixkv lm-eval ARGS``: lm-evaluation-harness with the ``mixkv`` model type (extra ``lm-eval``)."""

from __future__ import annotations

from collections.abc import Sequence

from mixkv.harnesses.press_arguments import run_harness_cli


def main(argv: Sequence[str] | None = None) -> int:
    """``mixkv lm-eval ARGS``: the harness's command line with the ``mixkv`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    return run_harness_cli("lm-eval", cli_evaluate, argv)
