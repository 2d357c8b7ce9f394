"""The one-command GPU check (``bash scripts/gpu_check.sh [OUT]``): everything that a CPU machine
cannot establish, run in one go on the day a GPU is available, in under 10 minutes on one modern
GPU, with a ``report.md`` and a non-zero exit status when anything failed.

Steps (each a separate process, run even when an earlier one failed):

1. ``device tests``: the test-suite's tests marked ``device`` (the end-to-end reference of
   compressed decoding, sdpa and eager, float32 and bfloat16; packed head-wise attention against
   attention segment by segment) with ``--device cuda``.
2. ``bench``: ``mixkv bench`` on a random model of Qwen2.5-0.5B's shape in bfloat16 at 8k, 16k and
   32k tokens with budgets 128 and 1024; the check fails unless every compressed cache holds exactly
   its kept entries (KV/kept within 1%, the physical limit of freeing memory) and less than the full
   cache. The report gives KV/kept and each method's decode speed over the full cache's.
3. ``qwen eval``: a slice of the text grid on Qwen2.5-Coder-0.5B-Instruct (``mixkv eval --device``).
4. ``tiny-vlm eval``: a slice of the image grid on the tiny VLM.

Without CUDA the same steps run in a reduced form on the CPU (two decoder layers, 512 tokens, one
example per cell; about a minute on 2 idle cores), so that the check cannot rot: ``tests/test_gpu_check.py`` runs
it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CPU_FORM",
    "GPU_FORM",
    "CheckForm",
    "CheckStep",
    "StepResult",
    "bench_failures",
    "choose_form",
    "main",
]

#: The largest KV/kept a compressed cache may show: it holds its kept entries and nothing else.
KV_OVER_KEPT_LIMIT = 1.01
#: Methods whose cache must physically hold only the kept entries (kvpress's mask, not free).
_FREEING_METHODS = ("snapkv", "adakv", "mixkv-snapkv", "mixkv-adakv")


@dataclass(frozen=True)
class CheckForm:
    """The sizes of one form of the check.

    Attributes
    ----------
    name
        ``"gpu"`` (the full check) or ``"cpu"`` (the reduced form run without CUDA).
    device
        Where every step runs.
    bench_dtype
        Parameter dtype of the benchmark.
    bench_layers
        Decoder layers of the benchmark's model (None: all 24 of Qwen2.5-0.5B).
    context_lengths, budgets
        The benchmark's prompt lengths and budgets.
    decode_tokens, warmup
        Tokens decoded per benchmark run, and untimed runs before the timed one.
    methods
        The benchmark's methods.
    eval_methods, eval_n
        Methods and examples per cell of both evaluation slices.
    qwen_context
        Context tokens of the text slice.
    """

    name: str
    device: str
    bench_dtype: str
    bench_layers: int | None
    context_lengths: tuple[int, ...]
    budgets: tuple[int, ...]
    decode_tokens: int
    warmup: int
    methods: tuple[str, ...]
    eval_methods: tuple[str, ...]
    eval_n: int
    qwen_context: int


GPU_FORM = CheckForm(
    name="gpu",
    device="cuda",
    bench_dtype="bfloat16",
    bench_layers=None,
    context_lengths=(8192, 16384, 32768),
    budgets=(128, 1024),
    decode_tokens=32,
    warmup=1,
    methods=("full", *_FREEING_METHODS),
    eval_methods=("full", "snapkv", "mixkv-snapkv", "adakv", "mixkv-adakv"),
    eval_n=10,
    qwen_context=2048,
)
CPU_FORM = CheckForm(
    name="cpu",
    device="cpu",
    bench_dtype="float32",
    bench_layers=2,
    context_lengths=(512,),
    budgets=(64,),
    decode_tokens=2,
    warmup=0,
    methods=("full", "mixkv-adakv"),
    eval_methods=("full", "mixkv-snapkv"),
    eval_n=1,
    qwen_context=256,
)


@dataclass(frozen=True)
class CheckStep:
    """One step: a command run in its own process.

    Attributes
    ----------
    name
        The step's name in the report.
    command
        The command line (``sys.executable -m ...``).
    out
        The folder the step writes into (None: nothing but its log).
    """

    name: str
    command: tuple[str, ...]
    out: Path | None = None


@dataclass(frozen=True)
class StepResult:
    """What one step did: its exit status, seconds, the tail of its output and any failed check."""

    step: CheckStep
    returncode: int
    seconds: float
    output_tail: str
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.failures


def choose_form(name: str = "auto") -> CheckForm:
    """``"gpu"``, ``"cpu"``, or ``"auto"``: the GPU form when torch sees CUDA, else the CPU form.

    Raises
    ------
    ValueError
        For another name, or ``"gpu"`` on a machine whose torch sees no CUDA GPU.
    """
    if name == "auto":
        return GPU_FORM if torch.cuda.is_available() else CPU_FORM
    if name == "gpu" and not torch.cuda.is_available():
        raise ValueError("--form gpu: torch sees no CUDA GPU here; use --form cpu (or auto).")
    forms = {form.name: form for form in (GPU_FORM, CPU_FORM)}
    if name not in forms:
        raise ValueError(f"--form must be auto, gpu or cpu, got {name!r}.")
    return forms[name]


def steps(form: CheckForm, out: Path) -> list[CheckStep]:
    """The check's steps in ``form``, writing under ``out``."""
    python = (sys.executable, "-m")
    tests = ("tests/test_end_to_end_reference.py", "tests/test_packed_plan.py")
    bench = [*python, "mixkv", "bench", "--model", "random-qwen2.5-0.5b", "--dtype", form.bench_dtype]
    if form.bench_layers is not None:
        bench += ["--layers", str(form.bench_layers)]
    bench += ["--context-lengths", ",".join(map(str, form.context_lengths))]
    bench += ["--budgets", ",".join(map(str, form.budgets)), "--methods", ",".join(form.methods)]
    bench += ["--batch-sizes", "1", "--decode-tokens", str(form.decode_tokens), "--repeats", "1"]
    bench += ["--warmup", str(form.warmup), "--memory-check", "0", "--no-plots", "--device", form.device]
    bench += ["--out", str(out / "bench")]
    evaluation = [*python, "mixkv", "eval", "--device", form.device, "--n", str(form.eval_n)]
    evaluation += ["--methods", ",".join(form.eval_methods), "--budgets", "128", "--no-resume"]
    qwen = [*evaluation, "--model", "qwen2.5-coder-0.5b", "--tasks", "niah_single_2"]
    qwen += ["--context-lengths", str(form.qwen_context), "--protocol", "query_aware"]
    qwen += ["--out", str(out / "eval-qwen")]
    vlm = [*evaluation, "--model", "tiny-vlm", "--tasks", "board_codes", "--out", str(out / "eval-tiny-vlm")]
    return [
        CheckStep(
            "device tests",
            (
                *python,
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-m",
                "device",
                "--device",
                form.device,
                *tests,
            ),
        ),
        CheckStep("bench", tuple(bench), out / "bench"),
        CheckStep("qwen eval", tuple(qwen), out / "eval-qwen"),
        CheckStep("tiny-vlm eval", tuple(vlm), out / "eval-tiny-vlm"),
    ]


def bench_failures(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the benchmark's rows break: a compressed cache that holds more than its kept entries
    (KV/kept above :data:`KV_OVER_KEPT_LIMIT`) or not less than the full cache of its context."""
    full = {r["context"]: r["kv_bytes"] for r in rows if r["method"] == "full"}
    failures = []
    for r in rows:
        if r["method"] not in _FREEING_METHODS:
            continue
        where = f"{r['method']} at {r['context']} tokens, budget {r['budget']}"
        if r["kv_over_kept"] > KV_OVER_KEPT_LIMIT:
            failures.append(f"{where}: the cache holds {r['kv_over_kept']:.3f}x its kept entries")
        if r["context"] in full and r["kv_bytes"] >= full[r["context"]]:
            failures.append(f"{where}: the cache ({r['kv_bytes']} B) is not smaller than the full cache's")
    return failures


def run_step(step: CheckStep, log: Path) -> StepResult:
    """Run ``step``, its output going to ``log``; a benchmark's rows are checked too."""
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as sink:
        done = subprocess.run(step.command, stdout=sink, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
    failures: list[str] = []
    if done.returncode == 0 and step.out is not None and (step.out / "bench.json").is_file():
        failures = bench_failures(json.loads((step.out / "bench.json").read_text())["results"])
    return StepResult(step, done.returncode, seconds, tail, tuple(failures))


def bench_table(rows: Sequence[dict[str, Any]]) -> str:
    """The report's benchmark table: KV held, KV/kept, and decode speed over the full cache's."""
    full = {r["context"]: r["decode_ms_per_token"] for r in rows if r["method"] == "full"}
    lines = [
        "| method | context | budget | KV MiB | KV/kept | decode ms/token | decode speed / full's |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = full[r["context"]] / r["decode_ms_per_token"] if r["context"] in full else float("nan")
        lines.append(
            f"| {r['method']} | {r['context']} | {r['budget'] if r['budget'] is not None else '-'} "
            f"| {r['kv_bytes'] / 2**20:.1f} | {r['kv_over_kept']:.3f} | {r['decode_ms_per_token']:.2f} "
            f"| {speed:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def write_report(out: Path, form: CheckForm, results: Sequence[StepResult]) -> Path:
    """Write ``out/report.md``: the machine, each step's status and time, the benchmark's table,
    the evaluation slices' tables, and the tail of every failed step's output."""
    from mixkv.benchmarks.bench_report import machine_info

    verdict = "PASSED" if all(r.passed for r in results) else "FAILED"
    lines = [f"# mixkv GPU check: {verdict}\n", f"Form: {form.name} (device {form.device}).\n"]
    lines.append("Machine: " + ", ".join(f"{k}={v}" for k, v in machine_info().items()) + "\n")
    lines += ["| step | status | seconds |", "|---|---|---:|"]
    for r in results:
        status = (
            "passed" if r.passed else f"FAILED (exit {r.returncode})" if r.returncode else "FAILED (checks)"
        )
        lines.append(f"| {r.step.name} | {status} | {r.seconds:.0f} |")
    lines.append("")
    for r in results:
        lines.append(f"## {r.step.name}\n\n`{' '.join(r.step.command)}`\n")
        lines += [f"* FAILED: {failure}" for failure in r.failures]
        bench_json = None if r.step.out is None else r.step.out / "bench.json"
        results_md = None if r.step.out is None else r.step.out / "results.md"
        if bench_json is not None and bench_json.is_file():
            lines.append(bench_table(json.loads(bench_json.read_text())["results"]))
        elif results_md is not None and results_md.is_file():
            lines.append(results_md.read_text(encoding="utf-8"))
        if not r.passed:
            lines += ["```", r.output_tail, "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None, run: Callable[[CheckStep, Path], StepResult] = run_step) -> int:
    """Run the check (``python -m mixkv.benchmarks.gpu_check [OUT] [--form auto|gpu|cpu]``) from the
    repository root; 0 when every step passed, 1 otherwise, 2 on bad arguments."""
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "out", nargs="?", default="gpu_check_out", help="output folder (default gpu_check_out)"
    )
    parser.add_argument(
        "--form",
        default="auto",
        help="auto (default: gpu when torch sees CUDA, else the reduced cpu form), gpu or cpu",
    )
    args = parser.parse_args(argv)
    try:
        form = choose_form(args.form)
    except ValueError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results = []
    for step in steps(form, out):
        print(f"gpu_check: {step.name} ...", flush=True)
        result = run(step, out / "logs" / f"{step.name.replace(' ', '-')}.log")
        print(
            f"gpu_check: {step.name}: {'passed' if result.passed else 'FAILED'} ({result.seconds:.0f} s)",
            flush=True,
        )
        results.append(result)
    report = write_report(out, form, results)
    print(f"gpu_check: report: {report}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
