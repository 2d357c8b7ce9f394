"""The `mixkv lm-eval` / `mixkv lmms-eval` wrapper's exit status (no harness needed: fake command lines)."""

import sys
import types

from mixkv.harnesses.harness_cli import run_harness_cli


def fake_harness(evaluation):
    """A module with an evaluation function and a command line that, like lmms-eval's, logs the
    evaluation's exception and returns normally."""
    module = types.ModuleType("fake_harness")
    module.evaluate_one = evaluation
    module.seen_argv = None

    def cli():
        module.seen_argv = list(sys.argv)
        try:
            module.evaluate_one()
        except Exception as exc:
            print(f"Error during evaluation: {exc}")

    return module, cli


def test_an_evaluation_with_results_exits_zero():
    module, cli = fake_harness(lambda: ({"results": {"task": {"acc": 1.0}}}, None))
    assert run_harness_cli("fake", cli, ["--tasks", "t"], watched=(module, "evaluate_one")) == 0
    assert module.seen_argv == ["fake", "--tasks", "t"]


def test_an_exception_the_harness_swallows_exits_one(capsys):
    def failing():
        raise ValueError("budget too small")

    module, cli = fake_harness(failing)
    assert run_harness_cli("fake", cli, [], watched=(module, "evaluate_one")) == 1
    assert "budget too small" in capsys.readouterr().err
    assert module.evaluate_one is failing  # restored


def test_an_evaluation_without_results_exits_one(capsys):
    module, cli = fake_harness(lambda: (None, None))
    assert run_harness_cli("fake", cli, [], watched=(module, "evaluate_one")) == 1
    assert "no results" in capsys.readouterr().err


def test_a_lazily_provided_function_is_watched_and_then_removed():
    module, cli = fake_harness(None)
    del module.evaluate_one
    module.__getattr__ = lambda name: (lambda: None) if name == "evaluate_one" else None
    assert run_harness_cli("fake", cli, [], watched=(module, "evaluate_one")) == 1
    assert "evaluate_one" not in vars(module)
