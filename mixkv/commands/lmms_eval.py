"""``mixkv lmms-eval ARGS``: lmms-eval with the ``mixkv`` model type (extra ``lmms-eval``)."""

from __future__ import annotations

from collections.abc import Sequence

from mixkv.harnesses.lmms_eval_entry import manifest
from mixkv.harnesses.press_arguments import run_harness_cli


def main(argv: Sequence[str] | None = None) -> int:
    """``mixkv lmms-eval ARGS``: lmms-eval's command line with the ``mixkv`` model type registered."""
    from lmms_eval.__main__ import cli_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    return run_harness_cli("lmms-eval", cli_evaluate, argv)
