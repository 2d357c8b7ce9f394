"""``mixkv fidelity``: top-1 agreement and KL against the full cache on natural text."""

from __future__ import annotations

from mixkv.commands.parsing import int_list, split_list
from mixkv.eval.text_fidelity import run_fidelity_sweep


def main(argv: list[str] | None = None) -> int:
    """``mixkv fidelity``: top-1 agreement and KL of every method x budget on natural text.

    Contexts are consecutive stretches of the Python standard library's documentation or, with
    ``--corpus source``, of its functions' source code (offline, deterministic), each followed by a
    teacher-forced continuation of the same text. Every figure
    is a mean over the texts with its 95% bootstrap interval; each MixKV method is compared with
    its base, and each ``+chunkN`` / ``+decodeN`` variant with its plain method, on the same texts
    (paired-bootstrap interval of the difference, exact sign test). The plain mixkv presses of a
    text share one forward over its context, which also gives the full-cache reference
    (:func:`_runs_sharing_one_prefill`: the same figures as a prefill per press); variants and
    kvpress presses prefill on their own.
    """
    import argparse
    import json
    from pathlib import Path

    from mixkv.eval.methods import check_methods, parse_method
    from mixkv.model_loading import load_model

    parser = argparse.ArgumentParser(prog="mixkv fidelity", description=main.__doc__)
    parser.add_argument(
        "--model",
        default=None,
        help="smollm2 (default), gemma3-270m, qwen2.5-coder-0.5b or a model directory",
    )
    parser.add_argument(
        "--methods",
        default="snapkv,mixkv-snapkv,adakv,mixkv-adakv,pyramidkv,mixkv-pyramidkv",
        help="comma separated; a mixkv press may end in +chunkN (the compressed side is prefilled in "
        "chunks of N tokens) and/or +decodeN (DecodingPress(interval=N); the continuation is then fed "
        "token by token), e.g. mixkv-snapkv,mixkv-snapkv+chunk512",
    )
    parser.add_argument("--budgets", default="64,128,256,512")
    parser.add_argument("--context-length", type=int, default=2048, help="context tokens per text")
    parser.add_argument("--texts", type=int, default=2, help="how many different contexts")
    parser.add_argument(
        "--corpus",
        choices=["docs", "source"],
        default="docs",
        help="docs: prose sentences of standard-library docstrings (17 texts of 2,048 + 64 tokens); source: "
        "the source code of standard-library functions (many more)",
    )
    parser.add_argument("--continuation-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("mixkv_fidelity.json"))
    args = parser.parse_args(argv)
    try:
        methods = check_methods(split_list(args.methods), variants=True)
        budgets = int_list(args.budgets, "--budgets")
    except ValueError as error:
        parser.error(str(error))
    if "full" in methods:
        parser.error("full compares the full cache with itself; leave it out of --methods")
    variants = {m: parse_method(m) for m in methods}

    model, tokenizer = load_model(args.model)
    result = run_fidelity_sweep(
        model,
        tokenizer,
        methods=variants,
        budgets=budgets,
        context_length=args.context_length,
        texts=args.texts,
        corpus=args.corpus,
        continuation_tokens=args.continuation_tokens,
        log=lambda line: print(line, flush=True),
    )
    config = vars(args) | {"out": str(args.out), "methods": methods, "budgets": budgets}
    args.out.write_text(json.dumps({"config": config, **result}, indent=1))
    print(f"wrote {args.out}")
    return 0
