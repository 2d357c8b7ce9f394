"""``mixkv eval`` as one process of a data-parallel grid in which rank ``MIXKV_TEST_FAIL_RANK`` fails
on its ``MIXKV_TEST_FAIL_AT``-th example (counted from 1): the run a test resumes. Launched by
``tests/test_data_parallel.py`` as ``torchrun ... -m tests.data_parallel_crash ARGS`` (ARGS those of
``mixkv eval``)."""

from __future__ import annotations

import os
import sys

from mixkv.commands.eval import main
from mixkv.eval.runner import TextGrid


class RankFailed(RuntimeError):
    """The failure this rank was told to have."""


if __name__ == "__main__":
    if os.environ["RANK"] == os.environ["MIXKV_TEST_FAIL_RANK"]:
        fail_at, prepare, calls = int(os.environ["MIXKV_TEST_FAIL_AT"]), TextGrid.prepare, [0]

        def failing_prepare(self, example, pending):
            calls[0] += 1
            if calls[0] == fail_at:
                raise RankFailed(f"rank {os.environ['RANK']} fails on its example {fail_at}, as told")
            return prepare(self, example, pending)

        TextGrid.prepare = failing_prepare
    sys.exit(main(sys.argv[1:]))
