"""Presses on a model whose KV heads transformers' tensor parallelism splits over 2 CPU ranks (gloo).

``torchrun --nproc-per-node 2`` loads a tiny Llama (8 query heads, 4 KV heads) with
``tp_plan="auto"``: each rank caches 2 KV heads of every layer. Every press must answer as in one
process, each rank must keep exactly its heads' share of the one-process cache (head-wise budgets
are allocated over all 4 heads), and the report must describe the whole model; one case is a
left-padded batch of two prompts, one a tiny Qwen2-VL (2 KV heads, one per rank) with an image.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mixkv.presses.head_shard import HeadShard
from tests.families import build_case
from tests.helpers_tiny import press_test_llama
from tests.tensor_parallel_run import run_presses, run_vlm

RANKS = 2
ROOT = Path(__file__).resolve().parent.parent
PRESSES = (
    "snapkv",
    "pyramidkv",
    "adakv",
    "mixkv-adakv",
    "sparsemm",
    "mixkv-snapkv-table",
    "adakv-decoding",
    "adakv-chunks",
    "mixkv-adakv-batch",
    "vlm",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(one-process results, [results of rank 0, rank 1])`` of every press."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    model = press_test_llama(kv_heads=4, heads=8)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    vlm = build_case("qwen2_vl")
    vlm_folder = tmp_path_factory.mktemp("tiny-qwen2-vl")
    vlm.model.save_pretrained(vlm_folder)
    torch.save(vlm.inputs, vlm_folder / "inputs.pt")
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={RANKS}",
        str(ROOT / "tests" / "tensor_parallel_run.py"),
        str(folder),
        str(vlm_folder),
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]
    return {**run_presses(model), "vlm": run_vlm(vlm.model, vlm.inputs)}, ranks


@pytest.mark.parametrize("name", PRESSES)
def test_every_rank_answers_as_one_process(runs, name):
    one, ranks = runs
    for rank in ranks:
        assert rank[name]["answer"] == one[name]["answer"]


@pytest.mark.parametrize("name", PRESSES)
def test_each_rank_keeps_its_heads_share_of_the_one_process_cache(runs, name):
    one, ranks = runs
    for layer, rows in enumerate(one[name]["kept_keys"]):
        for row, heads in enumerate(rows):
            sharded = [head for rank in ranks for head in rank[name]["kept_keys"][layer][row]]
            assert len(sharded) == len(heads)
            for got, expected in zip(sharded, heads, strict=True):
                assert got.shape == expected.shape, (layer, row, got.shape, expected.shape)
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", PRESSES)
def test_every_ranks_report_describes_the_whole_model(runs, name):
    one, ranks = runs
    for rank in ranks:
        assert torch.equal(rank[name]["kept_tokens"], one[name]["kept_tokens"])
        if name == "vlm":  # its bytes are not measured
            continue
        held_by_all = sum(each[name]["own_bytes"] for each in ranks)
        compressed, full = rank[name]["bytes"]
        # A rank whose heads keep equal counts stores them densely: a few bytes of packing
        # bookkeeping less than one process, so the bytes are those all ranks hold.
        assert full == one[name]["bytes"][1]
        assert compressed == held_by_all


def test_every_ranks_report_counts_the_image_tokens_all_heads_kept(runs):
    one, ranks = runs
    assert one["vlm"]["image_tokens_kept"][0] > 0
    for rank in ranks:
        assert rank["vlm"]["image_tokens_kept"] == pytest.approx(one["vlm"]["image_tokens_kept"], abs=1e-5)
        torch.testing.assert_close(
            rank["vlm"]["position_keep_fraction"], one["vlm"]["position_keep_fraction"], rtol=0, atol=1e-6
        )


def test_head_wise_budgets_differ_between_heads_so_the_gather_matters(runs):
    one, _ = runs
    kept = one["adakv"]["kept_tokens"][0]
    assert bool((kept != kept[:, :1]).any())


def test_bounded_decoding_compresses_alike_on_every_rank(runs):
    one, ranks = runs
    assert one["adakv-decoding"]["compressions"] > 0
    assert [rank["adakv-decoding"]["compressions"] for rank in ranks] == [
        one["adakv-decoding"]["compressions"]
    ] * RANKS


@pytest.mark.parametrize("what", ["calibrate", "continuous batching", "kvpress"])
def test_paths_that_would_see_one_ranks_heads_are_refused_by_name(runs, what):
    _, ranks = runs
    for rank in ranks:
        assert "not supported on a tensor-parallel model" in rank["refusals"][what]


def test_kv_heads_that_do_not_split_evenly_over_the_ranks_are_refused():
    with pytest.raises(ValueError, match="cannot be split evenly over 2 tensor-parallel ranks"):
        HeadShard(group=None, rank=0, size=2, num_kv_heads=3)
