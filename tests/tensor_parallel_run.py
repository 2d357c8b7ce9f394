"""The presses of ``tests/test_tensor_parallel.py``, run on a model in one process or on each rank.

Run under ``torchrun --nproc-per-node 2 tests/tensor_parallel_run.py MODEL_DIR VLM_DIR OUT_DIR``, every
rank loads ``MODEL_DIR`` with ``DistributedConfig(tp_plan="auto")`` (KV heads split over the ranks),
runs :func:`run_presses` and :func:`refusals`, loads the VLM of ``VLM_DIR`` likewise and runs
:func:`run_vlm` on its ``inputs.pt``, and saves what it got to ``OUT_DIR/rank{r}.pt``; the test runs
the same presses in one process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from transformers import DynamicCache

import mixkv
from mixkv.integration.cache import CompressedLayer
from mixkv.integration.decoder_layout import prefill, prefill_in_chunks

PROMPT_TOKENS = 120
NEW_TOKENS = 8


def presses(layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    """Uniform and head-wise presses (with per-head tables of the whole model), by name."""
    tables = torch.Generator().manual_seed(3)
    head_scores = torch.rand(layers, heads, generator=tables) + 0.05
    redundancy = torch.rand(layers, kv_heads, generator=tables)
    common = {"budget": 40, "window_size": 8}
    return {
        "snapkv": mixkv.SnapKVPress(**common),
        "pyramidkv": mixkv.PyramidKVPress(**common),
        "adakv": mixkv.AdaKVPress(**common),
        "mixkv-adakv": mixkv.MixKVPress(**common, base="adakv"),
        "sparsemm": mixkv.SparseMMPress(**common, head_scores=head_scores),
        "mixkv-snapkv-table": mixkv.MixKVPress(**common, redundancy=redundancy),
        "adakv-decoding": mixkv.DecodingPress(mixkv.AdaKVPress(**common), interval=4),
        "adakv-chunks": mixkv.AdaKVPress(**common),
        "mixkv-adakv-batch": mixkv.MixKVPress(**common, base="adakv"),
    }


def kept_entries(cache: Any) -> list[list[list[torch.Tensor]]]:
    """Per layer, sequence and KV head held by this process, the real keys the cache holds, oldest
    first."""
    held = []
    for layer in cache.layers:
        keys, _, mask = layer.entries() if isinstance(layer, CompressedLayer) else (layer.keys, None, None)
        if mask is None:
            mask = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool)
        head_mask = mask if mask.dim() == 3 else mask[:, None].expand(-1, keys.shape[1], -1)
        held.append(
            [
                [keys[row, head][head_mask[row, head]].clone() for head in range(keys.shape[1])]
                for row in range(keys.shape[0])
            ]
        )
    return held


def prompts(vocab_size: int, batch: bool) -> dict[str, torch.Tensor]:
    """One prompt, or two with the second 30 tokens shorter (left-padded with id 0)."""
    ids = torch.randint(4, vocab_size, (2, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    if not batch:
        return {"input_ids": ids[:1]}
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def run_presses(model: Any) -> dict[str, dict[str, Any]]:
    """Greedy answers, reports and kept keys of every press of :func:`presses` on one prompt (two
    for the names ending in ``-batch``)."""
    config = model.config
    results = {}
    for name, press in presses(
        config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    ).items():
        options: dict[str, Any] = {"prefill_chunk_size": 48} if name.endswith("chunks") else {}
        new_tokens = 3 * NEW_TOKENS if name.endswith("decoding") else NEW_TOKENS
        inputs = prompts(config.vocab_size, batch=name.endswith("batch"))
        with press(model):
            out = model.generate(
                **inputs, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True, **options
            )
        report = press.last_report
        results[name] = {
            "answer": out.sequences[:, PROMPT_TOKENS:].tolist(),
            "kept_tokens": report.kept_tokens,
            "kept_keys": kept_entries(out.past_key_values),
        }
        # The report's bytes are measured right after prefill, before any answer token.
        with press(model) as session:
            cache = DynamicCache()
            if name.endswith("chunks"):
                prefill_in_chunks(model, inputs["input_ids"], cache, 48, session)
            else:
                prefill(model, inputs.pop("input_ids"), cache, **inputs)
        results[name]["bytes"] = (press.last_report.compressed_bytes, press.last_report.full_bytes)
        results[name]["own_bytes"] = mixkv.kv_cache_bytes(cache)
        if name.endswith("decoding"):
            results[name]["compressions"] = press.compressions
    return results


def run_vlm(model: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Greedy answer, report and kept keys of MixKV-AdaKV on a VLM prompt with an image."""
    prompt = inputs["input_ids"].shape[1]
    press = mixkv.MixKVPress(budget=prompt // 3, window_size=4, base="adakv")
    with press(model):
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True
        )
    report = press.last_report
    return {
        "answer": out.sequences[:, prompt:].tolist(),
        "kept_tokens": report.kept_tokens,
        "image_tokens_kept": report.image_tokens_kept,
        "position_keep_fraction": report.position_keep_fraction,
        "kept_keys": kept_entries(out.past_key_values),
    }


class KvpressLikePress:
    """Stands for a press of NVIDIA's kvpress (recognised by its module)."""

    __module__ = "kvpress.presses.snapkv_press"


def refusals(model: Any) -> dict[str, str]:
    """What each path refused on a tensor-parallel model says (empty string if it was not refused)."""
    from mixkv.integration.calibration import calibrate
    from mixkv.integration.kvpress_bridge import press_applied
    from mixkv.integration.paged_support import check_model

    attempts = {
        "calibrate": lambda: calibrate(model, []),
        "continuous batching": lambda: check_model(model),
        "kvpress": lambda: press_applied(KvpressLikePress(), model).__enter__(),
    }
    said = {}
    for what, attempt in attempts.items():
        try:
            attempt()
            said[what] = ""
        except ValueError as error:
            said[what] = str(error)
    return said


def main(model_dir: str, vlm_dir: str, out_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, DistributedConfig

    torch.set_num_threads(1)
    parallel = DistributedConfig(tp_plan="auto")
    model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=parallel)
    results: dict[str, Any] = run_presses(model)
    results["refusals"] = refusals(model)
    vlm = AutoModelForImageTextToText.from_pretrained(vlm_dir, distributed_config=parallel)
    results["vlm"] = run_vlm(vlm, torch.load(os.path.join(vlm_dir, "inputs.pt")))
    torch.save(results, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
