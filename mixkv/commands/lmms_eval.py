"""``mixkv lmms-eval ARGS``: lmms-eval with the ``mixkv`` model type (extra ``lmms-eval``)."""

from __future__ import annotations

from collections.abc import Sequence

from mixkv.harnesses.harness_cli import run_harness_cli
from mixkv.harnesses.lmms_eval_entry import manifest


def main(argv: Sequence[str] | None = None) -> int:
    """``mixkv lmms-eval ARGS``: lmms-eval's command line with the ``mixkv`` model type registered.

    Exits 1 when an evaluation failed: lmms-eval itself logs the error and exits 0."""
    import lmms_eval.__main__ as lmms_eval_main
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    return run_harness_cli(
        "lmms-eval", lmms_eval_main.cli_evaluate, argv, watched=(lmms_eval_main, "cli_evaluate_single")
    )
