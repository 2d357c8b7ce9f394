"""The harness models' shared press arguments (`mixkv.harnesses.press_arguments`); no harness needed."""

import pytest
import torch

from mixkv.harnesses.press_arguments import (
    HARNESS_PRESS_NAMES,
    PressRun,
    default_device,
    default_dtype,
    split_press_arguments,
    unknown_arguments_error,
)
from mixkv.presses import CompressionReport


def test_press_arguments_are_split_from_the_model_arguments():
    run, rest = split_press_arguments(
        {"press": "snapkv", "budget": "24", "window_size": 8, "dtype": "float32"}, ("dtype",)
    )
    assert run.name == "snapkv" and run.press.budget == 24 and run.press.window_size == 8
    assert rest == {"dtype": "float32"}
    assert run.info() == {"press": "snapkv", "press_options": {"budget": "24", "window_size": 8}}
    run, rest = split_press_arguments({"press": "full", "device_map": "auto"}, strict=False)
    assert run.press is None and rest == {"device_map": "auto"}


def test_strict_models_refuse_every_unknown_argument_before_building_the_press():
    with pytest.raises(ValueError, match=r"\['window'\].*The model's own arguments: dtype") as info:
        split_press_arguments({"press": "snapkv", "budget": 24, "window": 8}, ("dtype",))
    assert "window -> window_size" in str(info.value)  # not the budget's error: window_size is 32


def test_a_misspelt_option_is_named_when_the_press_cannot_be_built():
    with pytest.raises(ValueError, match=r"\['window'\]"):
        split_press_arguments({"press": "snapkv", "budget": 24, "window": 8}, ("batch_size",), strict=False)
    with pytest.raises(ValueError, match="must be larger than window_size"):
        split_press_arguments(
            {"press": "snapkv", "budget": 24, "batch_size": 8}, ("batch_size",), strict=False
        )


def test_unknown_press_names_are_refused_with_the_names_the_harness_accepts():
    with pytest.raises(ValueError, match="Unknown press 'snapkvv'") as info:
        split_press_arguments({"press": "snapkvv"})
    assert "kvpress" not in str(info.value) and "mixkv-adakv" in str(info.value)
    with pytest.raises(ValueError, match="mixkv presses only") as info:
        split_press_arguments({"press": "kvpress-snapkv", "budget": 8})
    assert "kvpress-" not in str(info.value).split("Choose from:")[1]
    assert not any(name.startswith("kvpress") for name in HARNESS_PRESS_NAMES)


def test_an_option_of_another_press_is_refused_with_this_press_options():
    with pytest.raises(ValueError, match=r"\['floor_ratio'\].*snapkv's options: budget, compression_ratio"):
        split_press_arguments({"press": "snapkv", "budget": 24, "floor_ratio": 0.3})


def test_the_unknown_argument_error_suggests_the_closest_option():
    message = str(unknown_arguments_error("snapkv", ["window"], ("pretrained", "device")))
    assert "['window']" in message and "window_size" in message and "pretrained" in message
    assert "Did you mean: window -> window_size?" in message


def test_default_dtype_is_float32_on_the_cpu():
    assert default_dtype("cpu") == "float32" and default_dtype(torch.device("cpu")) == "float32"
    assert default_dtype("cuda:0") == "bfloat16"
    assert default_dtype("auto") == ("bfloat16" if torch.cuda.is_available() else "float32")
    assert default_dtype({"": "cpu"}) == "float32"
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def report(lengths, kept, full_bytes, compressed_bytes):
    return CompressionReport(
        context_lengths=lengths,
        budgets=[8] * len(lengths),
        kept_tokens=torch.tensor(kept),
        full_bytes=full_bytes,
        compressed_bytes=compressed_bytes,
    )


def test_press_run_statistics_average_over_prompts():
    run = PressRun("snapkv", {"budget": 8}, None)
    assert run.statistics() == {}
    run.record(report([40, 20], [[[8, 8]], [[6, 10]]], 600, 160))  # a batch of two prompts
    other = run.fresh()
    other.record(report([30], [[[12, 12]]], 300, 120))
    run.merge(other)
    assert run.statistics() == {
        "compressed_prompts": 3,
        "mean_context_tokens": 30.0,
        "mean_kept_tokens_per_kv_head": pytest.approx((8 + 8 + 12) / 3),
        "kv_fraction": pytest.approx(280 / 900),
    }
