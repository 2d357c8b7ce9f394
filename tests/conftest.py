"""Settings and fixtures shared by the test modules (the tiny models themselves: ``tests/helpers_tiny.py``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers_tiny import tiny_model_and_tokenizer

# The tests run tiny models whose ops are dominated by per-op overhead: one thread is faster and
# stays fast when the machine is shared.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """The 2-layer word-level Llama and its tokenizer (seed 0), built once per test module."""
    return tiny_model_and_tokenizer(seed=0)
