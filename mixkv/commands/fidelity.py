"""``mixkv fidelity``: top-1 agreement and KL against the full cache on natural text."""

from __future__ import annotations

import torch

from mixkv.eval.text_fidelity import FidelityReport, _compare, _run, _runs_sharing_one_prefill
from mixkv.integration.decoder_layout import describe_decoder


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
    import dataclasses
    import json
    from pathlib import Path

    from mixkv.eval.methods import check_methods, parse_method
    from mixkv.eval.source_tasks import source_functions
    from mixkv.eval.stats import bootstrap_ci, paired_comparison
    from mixkv.eval.stats_tables import format_p, mixkv_base_pairs
    from mixkv.eval.tasks import stdlib_sentences
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
        methods = check_methods([m for m in args.methods.split(",") if m.strip()], variants=True)
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError as error:
        parser.error(str(error))
    if "full" in methods:
        parser.error("full compares the full cache with itself; leave it out of --methods")
    variants = {m: parse_method(m) for m in methods}

    model, tokenizer = load_model(args.model)
    if args.corpus == "docs":
        pieces = [" " + sentence for sentence in stdlib_sentences()]
    else:
        pieces = [function.source + "\n\n" for function in source_functions()]
    ids: list[int] = []
    contexts: list[tuple[list[int], list[int]]] = []
    need = args.context_length + args.continuation_tokens
    for piece in pieces:
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            contexts.append((ids[: args.context_length], ids[args.context_length : need]))
            ids = []
            if len(contexts) == args.texts:
                break
    if len(contexts) < args.texts:
        raise ValueError(
            f"the {args.corpus} corpus holds only {len(contexts)} contexts of {need} tokens (context + "
            f"continuation); ask for at most {len(contexts)} --texts, use a shorter --context-length or "
            "the other --corpus"
        )

    reports: dict[tuple[str, int], list[FidelityReport]] = {(m, b): [] for m in methods for b in budgets}
    # The presses run_examples_together would give one shared prompt forward.
    sharing = {m: v.continues_a_prefix and v.decodes_together for m, v in variants.items()}
    layout = describe_decoder(model)
    layout_shares = len(layout.compressible_layers) == layout.num_layers
    for number, (context, continuation) in enumerate(contexts, 1):
        ctx = torch.tensor([context], device=model.device)
        cont = torch.tensor([continuation], device=model.device)
        # Plain mixkv presses share one forward over the context, which also gives the full cache.
        shared = [key for key in reports if sharing[key[0]]]
        presses = {key: variants[key[0]].press(key[1], context_tokens=args.context_length) for key in reports}
        if shared and layout_shares:
            full, runs = _runs_sharing_one_prefill(model, ctx, cont, [presses[key] for key in shared])
            compressed = dict(zip(shared, runs, strict=True))
        else:
            full, compressed = _run(model, ctx, cont, None), {}
        for key in reports:
            variant = variants[key[0]]
            run = (
                compressed[key]
                if key in compressed
                else _run(model, ctx, cont, presses[key], variant.prefill_chunk_size)
            )
            reports[key].append(_compare(full, run, ctx, cont))
        print(f"text {number} of {len(contexts)} done", flush=True)

    rows = []
    for (method, budget), found in reports.items():
        top1 = bootstrap_ci([r.top1_agreement for r in found])
        kl = bootstrap_ci([r.mean_kl for r in found])
        rows.append(
            {
                "method": method,
                "budget": budget,
                "texts": len(found),
                "top1_agreement": top1[0],
                "top1_agreement_ci": list(top1[1:]),
                "mean_kl": kl[0],
                "mean_kl_ci": list(kl[1:]),
                "reports": [r.to_dict() for r in found],
            }
        )
        print(
            f"{method:>24} budget {budget:>4}: top-1 agreement {top1[0]:.3f} [{top1[1]:.3f}, {top1[2]:.3f}], "
            f"mean KL {kl[0]:.3f} [{kl[1]:.3f}, {kl[2]:.3f}] (n = {len(found)} texts)"
        )
    pairs = mixkv_base_pairs(methods) + [
        (plain, m) for m in methods if (plain := variants[m].press_method) != m and plain in methods
    ]
    comparisons = []
    for a, b in pairs:
        for budget in budgets:
            line = f"{b} - {a}, budget {budget}:"
            for metric in ("top1_agreement", "mean_kl"):
                c = paired_comparison(
                    [getattr(r, metric) for r in reports[a, budget]],
                    [getattr(r, metric) for r in reports[b, budget]],
                )
                comparisons.append(
                    {"a": a, "b": b, "budget": budget, "metric": metric, **dataclasses.asdict(c)}
                )
                line += (
                    f" {metric} {c.difference:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]"
                    f" (higher / equal / lower {c.wins} / {c.ties} / {c.losses}, sign-test p {format_p(c.p_value)});"
                )
            print(line.rstrip(";"))
    config = vars(args) | {"out": str(args.out), "methods": methods, "budgets": budgets}
    args.out.write_text(json.dumps({"config": config, "rows": rows, "comparisons": comparisons}, indent=1))
    print(f"wrote {args.out}")
    return 0
