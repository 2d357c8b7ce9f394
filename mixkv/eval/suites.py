"""Fixed evaluation suites: one command, always the same grid, results comparable across changes.

``quick`` is the regression guard: a few minutes on 2 CPU cores, seeded, on the capable embedded
model. Its reference scores (with their 95% intervals) are recorded in the package
(``mixkv/eval/reference/quick.json``, copied from a run's ``suite_scores.json``);
:func:`compare_with_reference` tells which methods moved outside their recorded interval.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["SUITES", "Suite", "compare_with_reference", "suite_scores"]


@dataclass(frozen=True)
class Suite:
    """A fixed grid for :func:`mixkv.eval.runner.run_eval` (see its parameters)."""

    model: str
    dtype: str
    methods: tuple[str, ...]
    budgets: tuple[int, ...]
    tasks: tuple[str, ...]
    context_lengths: tuple[int, ...]
    n: int
    seed: int
    protocol: str

    def run_eval_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``run_eval`` (the model spec is ``self.model``)."""
        fields = asdict(self)
        fields.pop("model")
        return fields


SUITES: dict[str, Suite] = {
    "quick": Suite(
        model="qwen2.5-coder-0.5b",
        dtype="float32",
        methods=("full", "snapkv", "mixkv-snapkv", "adakv", "mixkv-adakv"),
        budgets=(128,),
        tasks=("niah_single_2", "agg_list", "multihop"),
        context_lengths=(1024,),
        n=10,
        seed=0,
        protocol="query_aware",
    ),
}

#: Where the reference of each suite is recorded (``<suite>.json``).
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def suite_scores(cells: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method (``method@budget``): mean score and 95% interval in percent over all its examples.

    Examples of every (task, context) cell of the method are pooled; the interval is the seeded
    percentile bootstrap of :func:`mixkv.eval.stats.bootstrap_ci`.
    """
    from mixkv.eval.stats import bootstrap_ci

    pooled: dict[str, list[float]] = {}
    for cell in cells:
        meta = cell["cell"]
        key = meta["method"] if meta["budget"] is None else f"{meta['method']}@{meta['budget']}"
        pooled.setdefault(key, []).extend(float(e["score"]) for e in cell["examples"])
    out = {}
    for key, scores in sorted(pooled.items()):
        mean, low, high = bootstrap_ci(scores)
        out[key] = {"n": len(scores), "mean": 100 * mean, "low": 100 * low, "high": 100 * high}
    return out


def compare_with_reference(
    name: str, scores: dict[str, dict[str, float]], reference: Path | None = None
) -> list[str]:
    """Lines comparing a suite's scores with its recorded reference.

    A method is flagged ``MOVED`` when its new mean lies outside the reference's 95% interval.
    Returns a line saying there is no reference when none is recorded.
    """
    path = reference or REFERENCE_DIR / f"{name}.json"
    if not path.is_file():
        return [f"No recorded reference for suite {name!r} at {path}."]
    recorded = json.loads(path.read_text(encoding="utf-8"))["scores"]
    lines = [f"Against the recorded reference ({path.name}):", ""]
    lines += ["| method | reference [95% CI] | now | status |", "|---|---|---|---|"]
    for key, ref in recorded.items():
        now = scores.get(key)
        if now is None:
            lines.append(f"| {key} | {ref['mean']:.1f} [{ref['low']:.1f}, {ref['high']:.1f}] | - | missing |")
            continue
        moved = not ref["low"] <= now["mean"] <= ref["high"]
        status = "MOVED" if moved else "within"
        lines.append(
            f"| {key} | {ref['mean']:.1f} [{ref['low']:.1f}, {ref['high']:.1f}] | {now['mean']:.1f} | {status} |"
        )
    return lines
