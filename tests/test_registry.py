"""The press registry: one name -> press mapping for every command, and `mixkv presses`."""

import json
import subprocess
import sys

import pytest
import torch

import mixkv
from mixkv.commands import main as cli_main
from mixkv.presses import NAMES, from_name, list_presses
from mixkv.presses.registry import KVPRESS_NAMES, build_press, kvpress_available, kvpress_scorer_press_names

MIXKV_NAMES = [n for n in NAMES if n != "full" and n not in KVPRESS_NAMES]


def test_full_is_no_press():
    assert from_name("full") is None
    assert from_name("full", budget=128) is None


@pytest.mark.parametrize(
    ("name", "press_class", "base"),
    [
        ("snapkv", mixkv.SnapKVPress, None),
        ("pyramidkv", mixkv.PyramidKVPress, None),
        ("adakv", mixkv.AdaKVPress, None),
        ("keydiff", mixkv.KeyDiffPress, None),
        ("knorm", mixkv.KnormPress, None),
        ("streamingllm", mixkv.StreamingLLMPress, None),
        ("random", mixkv.RandomPress, None),
        ("mixkv-snapkv", mixkv.MixKVPress, "snapkv"),
        ("mixkv-pyramidkv", mixkv.MixKVPress, "pyramidkv"),
        ("mixkv-adakv", mixkv.MixKVPress, "adakv"),
    ],
)
def test_name_builds_its_press_with_the_budget(name, press_class, base):
    press = from_name(name, budget=128)
    assert type(press) is press_class and press.budget == 128
    if base is not None:
        assert press.base == base


def test_sparsemm_names_take_head_scores():
    table = torch.rand(2, 4)
    assert isinstance(from_name("sparsemm", budget=64, head_scores=table), mixkv.SparseMMPress)
    assert from_name("mixkv-sparsemm", budget=64, head_scores=table).base == "sparsemm"


def test_options_reach_the_press():
    press = from_name("mixkv-adakv", budget=96, window_size=16, floor_ratio=0.3, pooling="max")
    assert (press.window_size, press.floor_ratio, press.pooling) == (16, 0.3, "max")


def test_compression_ratio_replaces_the_budget():
    press = from_name("snapkv", compression_ratio=0.75)
    assert press.budget is None and press.compression_ratio == 0.75


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="mixkv-adakv"):
        from_name("h2o", budget=64)


def test_unknown_option_lists_the_press_options():
    with pytest.raises(ValueError, match="floor_ratio"):
        from_name("adakv", budget=64, floor=0.3)


def test_option_fixed_by_the_name_is_refused():
    with pytest.raises(ValueError, match="takes no option"):
        from_name("mixkv-adakv", budget=64, base="snapkv")


def test_missing_budget_is_refused():
    with pytest.raises(ValueError, match="needs a budget"):
        from_name("snapkv")


@pytest.mark.skipif(kvpress_available(), reason="kvpress is installed")
@pytest.mark.parametrize("name", KVPRESS_NAMES)
def test_kvpress_names_without_kvpress_are_refused(name):
    with pytest.raises(ValueError, match=r"pip install mixkv\[kvpress\]"):
        from_name(name, budget=64, context_tokens=1000)


@pytest.mark.skipif(kvpress_available(), reason="kvpress is installed")
def test_kvpress_scorer_names_without_kvpress_are_refused():
    with pytest.raises(ValueError, match=r"pip install mixkv\[kvpress\]"):
        from_name("adakv@kvpress-tova", budget=64)
    assert kvpress_scorer_press_names() == ()


def test_parameters_list_the_press_defaults():
    params = {e.name: e.parameters() for e in list_presses()}
    assert params["adakv"]["floor_ratio"] == 0.2 and params["adakv"]["window_size"] == 32
    assert params["streamingllm"]["n_sink"] == 4
    assert "base" not in params["mixkv-adakv"] and params["mixkv-adakv"]["beta"] == 20
    assert params["full"] == {}


def test_build_press_gives_window_to_all_and_head_scores_to_sparsemm_only():
    table = torch.rand(2, 4)
    assert build_press("snapkv", 64, context_tokens=500, window_size=8, head_scores=table).window_size == 8
    sparse = build_press("mixkv-sparsemm", 64, context_tokens=500, window_size=8, head_scores=table)
    assert sparse.window_size == 8 and sparse.head_scores is table
    assert build_press("full", None, context_tokens=500) is None


def test_mixkv_presses_command_lists_every_name(capsys):
    assert cli_main(["presses"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line[:1].strip()}
    assert set(NAMES) <= listed


def test_mixkv_presses_json_gives_parameters(capsys):
    assert cli_main(["presses", "--json"]) == 0
    records = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert list(records) == [*NAMES, *kvpress_scorer_press_names()]
    assert records["mixkv-adakv"]["parameters"]["floor_ratio"] == 0.2


def test_presses_integration_and_bench_import_nothing_from_eval():
    code = (
        "import sys, mixkv, mixkv.presses, mixkv.integration, mixkv.presses.registry, "
        "mixkv.benchmarks.timed_runs, mixkv.benchmarks.bench_report, mixkv.benchmarks.random_models; "
        "print([m for m in sys.modules if m.startswith('mixkv.eval')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
