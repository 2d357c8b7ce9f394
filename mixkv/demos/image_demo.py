"""The image demo (``mixkv demo --model tiny-vlm``): one question about a picture, answered from the
full KV cache and from every press x budget, with a heat map of the image tokens each press kept.

The picture is a held-out test image of the tiny VLM (:mod:`mixkv.tiny_vlm`): a note board by
default (``--family chart`` or ``gui`` for the others), 400 image tokens, one per 16-pixel cell.
Each row of the table is a real prefill + greedy decode; the PNG shows the image and, for every
press and budget, the image overlaid with the fraction of (layer, KV head) caches that kept each
image token (white: dropped everywhere, dark red: kept everywhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mixkv.demos.document_demo import method_runs
from mixkv.eval.mm_example import MMExample
from mixkv.eval.mm_example_run import encode_example, example_prompt, prefill_image_prefix, run_mm_example
from mixkv.eval.mm_runner import observation_window
from mixkv.integration.decoder_layout import placeholder_token_id
from mixkv.presses.registry import build_press
from mixkv.tiny_vlm.images import GRID

__all__ = ["image_keep_map", "plot_keep_maps", "run_image_demo"]

DEFAULT_METHODS = ("full", "snapkv", "mixkv-snapkv", "adakv", "mixkv-adakv")
DEFAULT_BUDGETS = (32, 64, 128)


def image_keep_map(report: Any, input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``(GRID, GRID)`` fraction of (compressed layer, KV head) caches that kept each image cell.

    Raises
    ------
    ValueError
        If the report has no per-position figures (a chunked prefill) or the prompt does not hold
        exactly one image's tokens.
    """
    if report is None or report.position_keep_fraction is None:
        raise ValueError("the press's report has no per-position keep fractions (chunked prefill?).")
    positions = (input_ids[0] == image_token_id).nonzero().flatten()
    if positions.numel() != GRID * GRID:
        raise ValueError(f"expected {GRID * GRID} image tokens in the prompt, found {positions.numel()}.")
    return report.position_keep_fraction[0, positions.cpu()].reshape(GRID, GRID)


def run_image_demo(
    model: Any,
    processor: Any,
    example: MMExample,
    *,
    methods: list[str],
    budgets: list[int],
    log: Any = print,
) -> list[dict[str, Any]]:
    """Run every (method, budget) on one image example.

    The observation window is 32 tokens, or half the budget below 64 (as in the evaluation). The
    image and most of the prompt are prefilled once with the full cache, and every run continues
    from a copy of it (:func:`mixkv.eval.mm_example_run.prefill_image_prefix`), as the evaluation does;
    kvpress scorers (``<method>@kvpress-<scorer>``) prefill the whole prompt themselves.

    Returns
    -------
    list of dict
        One :func:`mixkv.eval.mm_example_run.run_mm_example` record per run, plus ``method``, ``budget``
        and ``keep_map`` (:func:`image_keep_map`, None for the full cache).
    """
    inputs = encode_example(processor, example, example_prompt(processor, example))
    context_tokens = int(inputs["input_ids"].shape[1])
    image_token_id = placeholder_token_id(model.config, "image")
    if image_token_id is None:
        raise ValueError(f"{type(model).__name__} has no image token id; the image demo needs a VLM.")
    too_big = [b for b in budgets if b >= context_tokens]
    if too_big:
        raise ValueError(
            f"budgets {too_big} are not below the {context_tokens}-token prompt; nothing would be compressed."
        )
    prefix = prefill_image_prefix(model, inputs, tail_tokens=32)
    rows = []
    for method, budget in method_runs(methods, budgets):
        window = observation_window(32, budget)
        press = build_press(method, budget, context_tokens=context_tokens, window_size=window)
        log(f"  running {method if budget is None else f'{method} @ {budget}'} ...")
        whole = getattr(press, "needs_layer_inputs", False)  # scores the whole prompt's forward
        record = run_mm_example(
            model, processor, example, press, inputs=inputs, prefix=None if whole else prefix
        )
        keep = None
        if press is not None:
            keep = image_keep_map(press.last_report, inputs["input_ids"], image_token_id)
        record.update(method=method, budget=budget, keep_map=keep)
        rows.append(record)
    return rows


def plot_keep_maps(example: MMExample, rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Write the heat-map PNG (one panel per press x budget); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from PIL import Image
    except ImportError:
        return False
    with Image.open(example.image_path) as im:
        picture = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    compressed = [r for r in rows if r["keep_map"] is not None]
    methods = list(dict.fromkeys(r["method"] for r in compressed))
    budgets = sorted({int(r["budget"]) for r in compressed})
    full = next((r for r in rows if r["method"] == "full"), None)
    columns = len(budgets) + 1
    fig, axes = plt.subplots(
        max(1, len(methods)), columns, figsize=(2.9 * columns, 3.2 * max(1, len(methods))), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(picture)
    verdict = (
        ""
        if full is None
        else f"\nfull cache: {full['output'][:14]!r} {'right' if full['score'] >= 1 else 'wrong'}"
    )
    axes[0, 0].set_title(f"{example.question}{verdict}", fontsize=7)
    gray = picture.mean(-1, keepdims=True).repeat(3, -1)
    cmap = plt.get_cmap("Reds")
    cell = picture.shape[0] // GRID
    for r in compressed:
        ax = axes[methods.index(r["method"]), 1 + budgets.index(int(r["budget"]))]
        keep = r["keep_map"].numpy().repeat(cell, 0).repeat(cell, 1)
        overlay = 0.35 * gray + 0.65 * cmap(keep)[..., :3]
        ax.imshow(overlay)
        mark = "right" if r["score"] >= 1 else "wrong"
        kept = r["image_tokens_kept"] / max(1, r["image_tokens_total"])
        ax.set_title(
            f"{r['method']} @ {r['budget']}: {r['output'][:10]!r} {mark}\n"
            f"KV {100 * r['kv_fraction']:.0f}% of full, image tokens {100 * kept:.0f}%",
            fontsize=7,
            color="tab:green" if r["score"] >= 1 else "tab:red",
        )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
