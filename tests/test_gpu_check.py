"""The one-command GPU check (`scripts/gpu_check.sh`): which form runs where, what the GPU form runs,
what fails it, and its reduced CPU form end to end (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixkv.benchmarks import gpu_check
from mixkv.benchmarks.gpu_check import CPU_FORM, GPU_FORM, CheckStep, StepResult, bench_failures, choose_form

ROOT = Path(__file__).resolve().parents[1]


def row(method, budget=128, kv_bytes=1000, kv_over_kept=1.0, context=8192):
    return {
        "method": method,
        "context": context,
        "budget": budget,
        "kv_bytes": kv_bytes,
        "kv_over_kept": kv_over_kept,
        "decode_ms_per_token": 10.0,
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_the_reduced_cpu_form_runs_and_the_gpu_form_is_refused():
    assert choose_form("auto") is CPU_FORM
    with pytest.raises(ValueError, match="torch sees no CUDA GPU here; use --form cpu"):
        choose_form("gpu")


def test_an_unknown_form_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="--form must be auto, gpu or cpu, got 'tpu'"):
        choose_form("tpu")


def test_the_gpu_form_runs_the_device_tests_bench_and_both_eval_slices_on_cuda(tmp_path):
    named = {step.name: " ".join(step.command) for step in gpu_check.steps(GPU_FORM, tmp_path)}
    assert list(named) == ["device tests", "bench", "qwen eval", "tiny-vlm eval"]
    assert "pytest" in named["device tests"] and "-m device --device cuda" in named["device tests"]
    bench = named["bench"]
    assert "--model random-qwen2.5-0.5b --dtype bfloat16" in bench and "--layers" not in bench
    assert "--context-lengths 8192,16384,32768 --budgets 128,1024" in bench and "--device cuda" in bench
    assert "--model qwen2.5-coder-0.5b" in named["qwen eval"] and "--device cuda" in named["qwen eval"]
    assert "--model tiny-vlm" in named["tiny-vlm eval"] and "--device cuda" in named["tiny-vlm eval"]


def test_a_cache_holding_more_than_its_kept_entries_fails_the_bench():
    rows = [row("full", None, kv_bytes=9000), row("snapkv"), row("mixkv-adakv", kv_over_kept=1.5)]
    assert bench_failures(rows) == [
        "mixkv-adakv at 8192 tokens, budget 128: the cache holds 1.500x its kept entries"
    ]


def test_a_compressed_cache_not_smaller_than_the_full_cache_fails_the_bench():
    rows = [row("full", None, kv_bytes=1000), row("adakv", kv_bytes=1000)]
    assert bench_failures(rows) == [
        "adakv at 8192 tokens, budget 128: the cache (1000 B) is not smaller than the full cache's"
    ]


def test_a_failed_step_makes_the_check_exit_1_and_the_report_say_so(tmp_path, monkeypatch):
    def run(step, log):
        code = 3 if step.name == "bench" else 0
        return StepResult(step, code, 1.0, "Traceback: out of memory" if code else "")

    monkeypatch.setattr(
        gpu_check, "steps", lambda form, out: [CheckStep("device tests", ("x",)), CheckStep("bench", ("y",))]
    )
    assert gpu_check.main([str(tmp_path), "--form", "cpu"], run=run) == 1
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# mixkv GPU check: FAILED")
    assert "| device tests | passed | 1 |" in report and "| bench | FAILED (exit 3) | 1 |" in report
    assert "Traceback: out of memory" in report


@pytest.mark.slow
def test_the_reduced_cpu_form_passes_and_writes_its_report(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out"), "--form", "cpu"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.startswith("# mixkv GPU check: PASSED")
    for step in ("device tests", "bench", "qwen eval", "tiny-vlm eval"):
        assert f"| {step} | passed |" in report
    assert "| mixkv-adakv | 512 | 64 |" in report and "| mixkv-snapkv |" in report
