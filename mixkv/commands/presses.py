"""``mixkv presses``: every method name with its press, parameters and defaults."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from mixkv.presses.kvpress_scorers import INSTALL_HINT, SCORER_METHODS, kvpress_scorer_names, scorer_options
from mixkv.presses.registry import kvpress_available, kvpress_scorer_press_names, list_presses, press_entry


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
    if args.json:
        for name in kvpress_scorer_press_names():
            entry = press_entry(name)
            params = {k: v for k, v in entry.parameters().items() if k not in ("budget", "compression_ratio")}
            print_fn(
                json.dumps(
                    {
                        "name": name,
                        "press": f"KvpressScorerPress(method={entry.fixed['method']!r}, scorer={entry.fixed['scorer']!r})",
                        "description": entry.description,
                        "parameters": {
                            k: v if isinstance(v, (int, float, str, bool)) else None
                            for k, v in params.items()
                        },
                    }
                )
            )
        return 0
    print_fn(
        "\nkvpress's scorers as the importance of a mixkv method, run by mixkv: <method>@kvpress-<scorer>"
    )
    print_fn(f"  <method>: {', '.join(SCORER_METHODS)} (snapkv: the same budget everywhere)")
    if not have_kvpress:
        print_fn(f"  <scorer>: kvpress is not installed (`{INSTALL_HINT}`)")
    for scorer in kvpress_scorer_names():
        options = ", ".join(f"{k}={v!r}" for k, v in scorer_options(scorer).items())
        print_fn(f"  {scorer:<18} {options}")
    print_fn(
        "\nEvery name but 'full' takes budget= (tokens per KV head, e.g. 128) or compression_ratio=; "
        "use: mixkv.presses.from_name(NAME, budget=128, **options)."
    )
    return 0
