"""Settings and fixtures shared by the test modules (the tiny models themselves: ``tests/helpers_tiny.py``)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from tests.helpers_tiny import tiny_model_and_tokenizer

# The tests run tiny models whose ops are dominated by per-op overhead: one thread is faster and
# stays fast when the machine is shared.
torch.set_num_threads(1)

#: Environment variable naming the device of the tests marked ``device`` (``--device`` wins).
DEVICE_VARIABLE = "MIXKV_TEST_DEVICE"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=None,
        help=f"torch device of the tests marked `device` (default: ${DEVICE_VARIABLE} or cpu), e.g. cuda",
    )


def chosen_device_name(config: pytest.Config) -> str:
    """The device the ``device`` tests run on: ``--device``, else ``$MIXKV_TEST_DEVICE``, else cpu."""
    return str(config.getoption("--device") or os.environ.get(DEVICE_VARIABLE) or "cpu")


def pytest_configure(config: pytest.Config) -> None:
    name = chosen_device_name(config)
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise pytest.UsageError(
            f"--device {name!r} is not a torch device ({exc}); e.g. cpu or cuda."
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"--device {name}: torch sees no CUDA GPU here; run the device tests with --device cpu."
        )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device of the tests marked ``device`` (``--device`` / ``$MIXKV_TEST_DEVICE``, cpu by default)."""
    return torch.device(chosen_device_name(request.config))


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """The 2-layer word-level Llama and its tokenizer (seed 0), built once per test module."""
    return tiny_model_and_tokenizer(seed=0)
