"""Smoke test of the benchmark harness on a tiny random Llama."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from mixkv.benchmarks.bench_report import machine_info, write_results
from mixkv.benchmarks.random_models import random_model
from mixkv.benchmarks.timed_runs import FIELDS, memory_flat_check, run_bench
from mixkv.commands.bench import main
from tests.helpers_tiny import random_llama


def _tiny_llama() -> LlamaForCausalLM:
    return random_llama(256, layers=2, max_position_embeddings=512)


def _bench(model, methods, context, budget, decode_tokens=2):
    """One timed run per cell at batch 1, no warm-up, an 8-token window: the harness, not the timing."""
    return run_bench(
        model,
        methods=methods,
        context_lengths=[context],
        budgets=[budget],
        batch_sizes=[1],
        decode_tokens=decode_tokens,
        repeats=1,
        warmup=0,
        window_size=8,
    )


def test_run_bench_fields_ratios_and_files(tmp_path):
    model = _tiny_llama()
    rows = _bench(model, ["full", "mixkv-adakv"], context=128, budget=48, decode_tokens=4)
    assert [r["method"] for r in rows] == ["full", "mixkv-adakv"]
    for r in rows:
        for field in FIELDS:
            assert field in r, field
        assert r["decode_steps_timed"] >= 4
        assert r["prefill_s_min"] <= r["prefill_s_median"] <= r["prefill_s_max"]
        assert r["kv_over_kept"] <= 1.02
        assert r["peak_mem_bytes"] > 0
    full, mix = rows
    assert full["kv_over_kept"] == 1.0
    assert full["compression_s_median"] == 0.0
    assert mix["kv_bytes"] < full["kv_bytes"]
    assert mix["kept_entries"] == 48 * 2 * 2  # budget x layers x KV heads (batch 1)

    paths = write_results(rows, tmp_path, machine=machine_info(), command="test", plots=False)
    data = json.loads(paths["json"].read_text())
    assert len(data["results"]) == 2 and "torch" in data["machine"]
    assert "| mixkv-adakv | 128 | 48 |" in paths["markdown"].read_text()


def test_memory_check_and_cli(tmp_path, monkeypatch):
    model = _tiny_llama()
    mc = memory_flat_check(model, context=64, budget=24, generations=2, decode_tokens=2, window_size=8)
    assert {"mem_before_bytes", "mem_after_bytes", "growth", "flat"} <= mc.keys()

    monkeypatch.setattr("mixkv.commands.bench.load_bench_model", lambda name, dtype, layers: _tiny_llama())
    rc = main(
        [
            "--methods", "full,snapkv",
            "--context-lengths", "64",
            "--budgets", "24",
            "--window-size", "8",
            "--decode-tokens", "2",
            "--repeats", "1",
            "--warmup", "0",
            "--memory-check", "0",
            "--no-plots",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert rc == 0
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.md").exists()


def test_random_models_keep_their_shape_when_cut_to_fewer_layers():
    model = random_model("random-smollm2", layers=2)
    config = model.config
    assert (config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == (2, 3, 64)


def test_random_qwen2vl_shaped_model_is_benched_with_its_mrope_decoder(tmp_path):
    model = random_model("random-qwen2vl-2b", layers=1)
    text = model.config.get_text_config()
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    rows = _bench(model, ["full", "mixkv-adakv"], context=64, budget=40)
    compressed = rows[1]
    assert compressed["kept_entries"] == 1 * 1 * 2 * 40
    assert compressed["kv_over_kept"] <= 1.02


@pytest.mark.parametrize(
    ("name", "layers", "message"),
    [("random-gpt", None, "unknown random model"), ("random-smollm2", 31, "layers must be")],
)
def test_bad_random_model_requests_are_refused(name, layers, message):
    with pytest.raises(ValueError, match=message):
        random_model(name, layers=layers)


def test_kvpress_cells_get_equal_kept_counts_and_a_press_that_only_masks_shows_its_full_bytes(monkeypatch):
    import contextlib
    import dataclasses
    import types

    @dataclasses.dataclass
    class MaskingPress:  # stands in for kvpress: keeps the whole cache, whatever it selects
        compression_ratio: float = 0.0
        window_size: int = 64

        def __call__(self, model):
            seen.append(self.compression_ratio)
            return contextlib.nullcontext()

    seen: list[float] = []
    fake = types.ModuleType("kvpress")
    fake.SnapKVPress = MaskingPress
    fake.KeyDiffPress = MaskingPress
    fake.AdaKVPress = lambda inner: inner
    monkeypatch.setitem(sys.modules, "kvpress", fake)
    rows = _bench(_tiny_llama(), ["kvpress-adakv"], context=64, budget=16)
    assert seen == [0.75]  # 1 - budget / context: the same kept count as mixkv's budget 16
    assert rows[0]["kept_entries"] == 2 * 2 * 16  # layers x KV heads x budget
    assert rows[0]["kv_over_kept"] == 4.0  # it still holds all 64 entries per head


def test_chunked_prefill_cells_hold_the_one_go_bytes_and_decoding_cells_stay_bounded():
    rows = run_bench(
        _tiny_llama(),
        methods=["snapkv"],
        context_lengths=[128],
        budgets=[24],
        batch_sizes=[1],
        decode_tokens=40,
        repeats=1,
        warmup=0,
        window_size=8,
        prefill_chunks=[None, 32],
        decoding_intervals=[None, 8],
    )
    by_cell = {(r["prefill_chunk"], r["decoding_interval"]): r for r in rows}
    assert len(by_cell) == 4
    assert by_cell[(32, None)]["kv_bytes"] == by_cell[(None, None)]["kv_bytes"]
    per_token = 2 * 2 * 2 * 16 * 4  # layers x KV heads x (key, value) x head_dim x float32
    plain = [held for _, held in by_cell[(None, None)]["kv_bytes_over_decode"]]
    bounded = [held for _, held in by_cell[(None, 8)]["kv_bytes_over_decode"]]
    assert plain[-1] == plain[0] + 40 * per_token
    assert max(bounded) < plain[0] + 8 * per_token


def test_random_qwen25_shaped_model_has_its_heads_and_context():
    with torch.device("meta"):  # the shape only: no 136M-parameter embedding to initialise
        config = random_model("random-qwen2.5-0.5b", layers=1).config
    shape = (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size)
    assert shape == (14, 2, 64, 896) and config.max_position_embeddings == 32768
