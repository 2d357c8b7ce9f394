"""The request-stream benchmark of ``mixkv bench-serving`` (mixkv.benchmarks.serving_load) on a tiny Llama.

Every request finishes with its tokens counted, the in-flight counts are bounded by the stream, and at
the same cache size a press holds more requests in flight than the full cache.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from mixkv.integration.paged_support import engine_unavailable_reason

_UNAVAILABLE = engine_unavailable_reason()
if _UNAVAILABLE is not None:
    pytest.skip(
        f"transformers' continuous-batching engine is unavailable: {_UNAVAILABLE}", allow_module_level=True
    )

from mixkv.benchmarks.serving_load import (  # noqa: E402
    ServingSettings,
    corpus_tokens,
    markdown_table,
    prompt_lengths,
    run_config,
    synthetic_prompts,
)
from mixkv.commands import bench_serving  # noqa: E402
from tests.helpers_tiny import press_test_llama, word_tokenizer  # noqa: E402

REQUESTS = 12
NEW_TOKENS = 6
# Room for about three full requests of the mean length (90 prompt tokens plus the answer).
SETTINGS = ServingSettings(
    cache_tokens=3 * 100, page_size=8, max_batch_tokens=64, new_tokens=NEW_TOKENS, window_size=8
)


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, Any]]:
    model = press_test_llama()
    lengths = prompt_lengths(REQUESTS, 60, 120, seed=0)
    stream = [(i * 37) % 127 + 1 for i in range(1000)]
    prompts = synthetic_prompts(stream, lengths, seed=0)
    return {
        "full": run_config(model, prompts, "full", None, SETTINGS),
        "snapkv-16": run_config(model, prompts, "snapkv", 16, SETTINGS),
    }


def test_every_request_finishes_and_counts_add_up(rows: dict[str, dict[str, Any]]) -> None:
    for row in rows.values():
        assert row["finished"] == row["requests"] == REQUESTS
        assert row["generated_tokens"] == REQUESTS * NEW_TOKENS
        assert 1 <= row["max_in_flight"] <= REQUESTS
        assert 0 < row["mean_in_flight"] <= row["max_in_flight"]
        assert 0 < row["peak_pages"] <= row["total_pages"] == 300 // 8 + 1
        assert row["output_tokens_per_s"] > 0 and row["wall_s"] > 0
        assert row["ttft_p50_s"] <= row["ttft_p95_s"]
        assert row["tpot_p50_s"] <= row["tpot_p95_s"]
    full, press = rows["full"], rows["snapkv-16"]
    assert full["kept_tokens"] == full["prompt_tokens"] and full["freed_pages"] == 0
    assert press["kept_tokens"] == REQUESTS * 16 and press["freed_pages"] > 0


def test_a_press_holds_more_requests_in_flight_at_the_same_cache_size(
    rows: dict[str, dict[str, Any]],
) -> None:
    full, press = rows["full"], rows["snapkv-16"]
    assert press["mean_in_flight"] > full["mean_in_flight"]
    assert press["max_in_flight"] > full["max_in_flight"]
    assert press["mean_pages"] / press["mean_in_flight"] < full["mean_pages"] / full["mean_in_flight"]


def test_table_and_report(rows: dict[str, dict[str, Any]], tmp_path: Any) -> None:
    table = markdown_table(list(rows.values()))
    assert table.count("\n") == 1 + len(rows)
    for name, row in rows.items():
        (tmp_path / f"config-{name}.json").write_text(json.dumps(row))
    argv = [
        "--methods",
        "snapkv",
        "--budgets",
        "16",
        "--prompt-tokens",
        "60,120",
        "--out",
        str(tmp_path),
        "--report",
    ]
    assert bench_serving.main(argv) == 0
    assert [r["config"] for r in json.loads((tmp_path / "serving.json").read_text())] == ["full", "snapkv-16"]
    assert (tmp_path / "serving.md").read_text().startswith("| config |")


def test_prompts_are_seeded_slices_of_text() -> None:
    tokens = corpus_tokens(word_tokenizer(), 500)
    assert len(tokens) >= 500
    lengths = prompt_lengths(5, 10, 40, seed=3)
    assert lengths == prompt_lengths(5, 10, 40, seed=3) and all(10 <= n <= 40 for n in lengths)
    prompts = synthetic_prompts(tokens, lengths, seed=3)
    assert [len(p) for p in prompts] == lengths and prompts == synthetic_prompts(tokens, lengths, seed=3)
    with pytest.raises(ValueError):
        prompt_lengths(2, 5, 4, seed=0)
