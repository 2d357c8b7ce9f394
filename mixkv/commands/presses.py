"""``mixkv presses``: every method name with its press, parameters and defaults."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from mixkv.presses.registry import kvpress_available, list_presses


def main(argv: Sequence[str] | None = None, print_fn: Callable[[str], None] = print) -> int:
    """``mixkv presses``: list every method name with its press, parameters and defaults."""
    parser = argparse.ArgumentParser(
        prog="mixkv presses",
        description="List the method names accepted by every mixkv command and mixkv.presses.from_name.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per name instead")
    args = parser.parse_args(argv)
    have_kvpress = kvpress_available()
    for entry in list_presses():
        press = entry.press_class.__name__ if entry.press_class is not None else "-"
        if entry.fixed:
            press += "(" + ", ".join(f"{k}={v!r}" for k, v in entry.fixed.items()) + ")"
        if entry.is_kvpress:
            press = "kvpress" + ("" if have_kvpress else " (not installed)")
        params = {k: v for k, v in entry.parameters().items() if k not in ("budget", "compression_ratio")}
        if args.json:
            record: dict[str, Any] = {"name": entry.name, "press": press, "description": entry.description}
            record["parameters"] = {
                k: v if isinstance(v, (int, float, str, bool)) else None for k, v in params.items()
            }
            print_fn(json.dumps(record))
            continue
        print_fn(f"{entry.name:<16} {press:<30} {entry.description}")
        if params:
            print_fn(" " * 17 + ", ".join(f"{k}={v!r}" for k, v in params.items()))
    if not args.json:
        print_fn(
            "\nEvery name but 'full' takes budget= (tokens per KV head, e.g. 128) or compression_ratio=; "
            "use: mixkv.presses.from_name(NAME, budget=128, **options)."
        )
    return 0
