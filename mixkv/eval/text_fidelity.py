"""How faithfully a compressed cache reproduces the full cache, on any model, text and press.

The context is prefilled twice, once into a full cache and once with the press active (which
compresses the cache at the end of prefill). A continuation is then fed, teacher-forced, through
both caches, and the next-token distributions and each layer's attention outputs on the
continuation tokens are compared:

* ``top1_agreement``: fraction of continuation positions where both argmaxes agree;
* ``mean_kl``: mean over positions of ``KL(p_full || p_compressed)`` in nats;
* ``layer_relative_error[l]``: ``||o_c - o_f|| / ||o_f||`` of layer ``l``'s attention-module output
  (after its output projection) over all continuation tokens.

The compressed side may prefill in chunks (``prefill_chunk``, compressed as they arrive) and, under
a :class:`~mixkv.DecodingPress`, feeds the continuation one token per forward so the cache is
compressed again every ``interval`` tokens, as while generating.

:func:`run_fidelity_sweep` measures every method x budget on consecutive stretches of the Python
standard library's text (``mixkv fidelity``), each figure with its bootstrap interval over the
texts, and compares methods paired on the same texts.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mixkv.eval.haystack import stdlib_sentences
from mixkv.eval.source_tasks import source_functions
from mixkv.eval.stats import bootstrap_ci, paired_comparison
from mixkv.eval.stats_tables import format_p, mixkv_base_pairs
from mixkv.integration.cache import kv_cache_bytes
from mixkv.integration.decoder_layout import cache_argument, describe_decoder, prefill, prefill_in_chunks
from mixkv.integration.kvpress_bridge import press_applied
from mixkv.integration.prompt_recording import RecordedPrompt
from mixkv.presses.decoding import DecodingPress

if TYPE_CHECKING:
    from mixkv.eval.runner import MethodVariant

__all__ = ["FidelityReport", "measure_fidelity", "measure_fidelity_ids", "run_fidelity_sweep"]


@dataclass
class FidelityReport:
    """Agreement between full-cache and compressed-cache predictions.

    Attributes
    ----------
    top1_agreement
        Fraction of continuation positions whose top-1 next token is the same.
    mean_kl, max_kl
        Mean and max over positions of ``KL(full || compressed)`` (nats).
    kl_per_position
        The KL at each continuation position.
    layer_relative_error
        Per decoder layer, ``||o_c - o_f|| / ||o_f||`` of the attention output on the continuation.
    full_top1_accuracy, compressed_top1_accuracy
        How often each cache's top-1 prediction equals the actual next continuation token.
    context_tokens, continuation_tokens
        Token counts.
    full_kv_bytes, compressed_kv_bytes
        Cache sizes right after prefilling the context.
    """

    top1_agreement: float
    mean_kl: float
    max_kl: float
    kl_per_position: list[float] = field(default_factory=list)
    layer_relative_error: list[float] = field(default_factory=list)
    full_top1_accuracy: float = 0.0
    compressed_top1_accuracy: float = 0.0
    context_tokens: int = 0
    continuation_tokens: int = 0
    full_kv_bytes: int = 0
    compressed_kv_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return dict(self.__dict__)


_Run = tuple[torch.Tensor, list[torch.Tensor | None], int]


@contextlib.contextmanager
def _capture(modules: list[torch.nn.Module], store: list[torch.Tensor | None]) -> Iterator[None]:
    def make_hook(i: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            out = (output[0] if isinstance(output, tuple) else output).detach().to(torch.float32)
            previous = store[i]  # token-by-token forwards: the continuation's outputs in order
            store[i] = out.clone() if previous is None else torch.cat([previous, out], dim=1)

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run(
    model: Any,
    context: torch.Tensor,
    continuation: torch.Tensor,
    press: Any | None,
    prefill_chunk: int | None = None,
) -> _Run:
    from transformers import DynamicCache

    modules = describe_decoder(model).attention_modules
    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), press_applied(press, model) as session:
        if prefill_chunk is None or session is None:
            prefill(model, context, cache)
        else:
            prefill_in_chunks(model, context, cache, prefill_chunk, session)
        return _continue(model, modules, cache, continuation, token_by_token=isinstance(press, DecodingPress))


def _continue(
    model: Any,
    modules: list[torch.nn.Module],
    cache: Any,
    continuation: torch.Tensor,
    *,
    token_by_token: bool = False,
) -> _Run:
    """Teacher-force ``continuation`` through a prefilled ``cache``: logits, the output of every
    attention module of ``modules`` on it, and the cache's bytes before it."""
    outputs: list[torch.Tensor | None] = [None] * len(modules)
    kwargs = {cache_argument(model): cache, "use_cache": True}
    n_bytes = kv_cache_bytes(cache)
    with torch.inference_mode(), _capture(modules, outputs):
        if token_by_token:
            steps = [model(input_ids=token, **kwargs).logits for token in continuation.split(1, dim=1)]
            logits = torch.cat(steps, dim=1)
        else:
            logits = model(input_ids=continuation, **kwargs).logits
    return logits[0].to(torch.float32), outputs, n_bytes


def _runs_sharing_one_prefill(
    model: Any, context: torch.Tensor, continuation: torch.Tensor, presses: list[Any]
) -> tuple[_Run, list[_Run]]:
    """The full-cache run and one run per mixkv press (one-forward prefill, no DecodingPress)
    from a single forward over ``context``: each press compresses after a layer has attended, so
    the forward is the same under all of them and the full cache is what they all start from
    (:meth:`~mixkv.integration.session.PressSession.recording_prompt`)."""
    from transformers import DynamicCache

    if not presses:
        raise ValueError("give at least one press")
    modules = describe_decoder(model).attention_modules
    runs = []
    recorded: RecordedPrompt | None = None
    for press in presses:
        with torch.inference_mode(), press_applied(press, model) as session:
            if recorded is None:
                cache = DynamicCache(config=model.config)
                with session.recording_prompt() as recorded:
                    prefill(model, context, cache)
            else:
                cache = session.compress_recorded(recorded)
            runs.append(_continue(model, modules, cache, continuation))
    assert recorded is not None  # for the type checker: the first press recorded
    return _continue(model, modules, recorded.full_cache(), continuation), runs


def measure_fidelity_ids(
    model: Any,
    context_ids: torch.Tensor | list[int],
    continuation_ids: torch.Tensor | list[int],
    press: Any,
    *,
    prefill_chunk: int | None = None,
) -> FidelityReport:
    """Compare full and compressed caches on token ids (see :func:`measure_fidelity`).

    Parameters
    ----------
    model
        A causal LM.
    context_ids
        Context tokens, ``(N,)`` or ``(1, N)``; prefilled (and compressed by ``press``).
    continuation_ids
        Continuation tokens, ``(T,)`` or ``(1, T)``, ``T >= 1``; teacher-forced through the cache.
    press
        The press under test (``press(model)`` is a context manager), or None (compares the full
        cache with itself). A :class:`~mixkv.DecodingPress` gets the continuation one token per
        forward.
    prefill_chunk
        Prefill the compressed side this many tokens per forward (the full cache always in one go).

    Returns
    -------
    FidelityReport

    Raises
    ------
    ValueError
        If the context or the continuation is empty, or they are not one sequence.
    """
    ctx = torch.as_tensor(context_ids, dtype=torch.long).reshape(1, -1).to(model.device)
    cont = torch.as_tensor(continuation_ids, dtype=torch.long).reshape(1, -1).to(model.device)
    if ctx.shape[1] < 1 or cont.shape[1] < 1:
        raise ValueError(
            f"Need a non-empty context and continuation, got {ctx.shape[1]} and {cont.shape[1]} tokens."
        )
    return _compare(_run(model, ctx, cont, None), _run(model, ctx, cont, press, prefill_chunk), ctx, cont)


def _compare(full: _Run, compressed: _Run, ctx: torch.Tensor, cont: torch.Tensor) -> FidelityReport:
    """The report of one compressed run against the full-cache run of the same context."""
    (full_logits, full_out, full_bytes), (comp_logits, comp_out, comp_bytes) = full, compressed
    logp_f = F.log_softmax(full_logits, dim=-1)
    logp_c = F.log_softmax(comp_logits, dim=-1)
    kl = (logp_f.exp() * (logp_f - logp_c)).sum(-1).clamp_min(0.0)
    top_f, top_c = full_logits.argmax(-1), comp_logits.argmax(-1)
    targets = cont[0, 1:]
    layer_err: list[float] = []
    for o_f, o_c in zip(full_out, comp_out, strict=True):
        if o_f is None or o_c is None:
            layer_err.append(float("nan"))
            continue
        denom = o_f.norm().item()
        layer_err.append((o_c - o_f).norm().item() / denom if denom > 0 else 0.0)
    n_pred = targets.numel()
    return FidelityReport(
        top1_agreement=(top_f == top_c).float().mean().item(),
        mean_kl=kl.mean().item(),
        max_kl=kl.max().item(),
        kl_per_position=kl.tolist(),
        layer_relative_error=layer_err,
        full_top1_accuracy=(top_f[:-1] == targets).float().mean().item() if n_pred else 0.0,
        compressed_top1_accuracy=(top_c[:-1] == targets).float().mean().item() if n_pred else 0.0,
        context_tokens=int(ctx.shape[1]),
        continuation_tokens=int(cont.shape[1]),
        full_kv_bytes=full_bytes,
        compressed_kv_bytes=comp_bytes,
    )


def measure_fidelity(
    model: Any,
    tokenizer: Any,
    text: str,
    press: Any,
    *,
    continuation_tokens: int = 64,
    continuation: str | None = None,
) -> FidelityReport:
    """Measure how closely ``press`` reproduces the full cache on a text.

    Parameters
    ----------
    model, tokenizer
        A causal LM and its tokenizer.
    text
        The context (or, without ``continuation``, context followed by the continuation).
    press
        The press under test, or None.
    continuation_tokens
        Without ``continuation``: the last ``continuation_tokens`` tokens of ``text`` are the
        teacher-forced continuation, the rest is the context.
    continuation
        An explicit continuation text; then ``text`` is the whole context.

    Returns
    -------
    FidelityReport

    Raises
    ------
    ValueError
        If the text is too short to leave a context of at least one token.
    """
    if continuation is not None:
        ctx_ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    else:
        if continuation_tokens < 1:
            raise ValueError(f"continuation_tokens must be >= 1, got {continuation_tokens}.")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) <= continuation_tokens:
            raise ValueError(
                f"The text has {len(ids)} tokens, not more than continuation_tokens={continuation_tokens}; "
                "pass a longer text or fewer continuation tokens."
            )
        ctx_ids, cont_ids = ids[:-continuation_tokens], ids[-continuation_tokens:]
    return measure_fidelity_ids(model, ctx_ids, cont_ids, press)


# ---------------------------------------------------------------------------------------------
# The sweep of ``mixkv fidelity``

_Cell = tuple[str, int]  # (method, budget)


def _corpus_texts(
    tokenizer: Any, corpus: str, context_length: int, continuation_tokens: int, texts: int
) -> list[tuple[list[int], list[int]]]:
    """The first ``texts`` ``(context, continuation)`` token stretches of ``corpus``: docstring
    sentences (``"docs"``) or function sources (``"source"``) tokenized one after another, a
    stretch ending as soon as it is long enough."""
    if corpus == "docs":
        pieces = [" " + sentence for sentence in stdlib_sentences()]
    else:
        pieces = [function.source + "\n\n" for function in source_functions()]
    ids: list[int] = []
    contexts: list[tuple[list[int], list[int]]] = []
    need = context_length + continuation_tokens
    for piece in pieces:
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            contexts.append((ids[:context_length], ids[context_length:need]))
            ids = []
            if len(contexts) == texts:
                break
    if len(contexts) < texts:
        raise ValueError(
            f"the {corpus} corpus holds only {len(contexts)} contexts of {need} tokens (context + "
            f"continuation); ask for at most {len(contexts)} --texts, use a shorter --context-length or "
            "the other --corpus"
        )
    return contexts


def _measure_texts(
    model: Any,
    texts: Sequence[tuple[list[int], list[int]]],
    methods: Mapping[str, MethodVariant],
    budgets: Sequence[int],
    context_length: int,
    log: Callable[[str], None],
) -> dict[_Cell, list[FidelityReport]]:
    """One report per text for every method x budget."""
    reports: dict[_Cell, list[FidelityReport]] = {(m, b): [] for m in methods for b in budgets}
    # The presses run_examples_together would give one shared prompt forward.
    sharing = {m: v.continues_a_prefix and v.decodes_together for m, v in methods.items()}
    layout = describe_decoder(model)
    layout_shares = len(layout.compressible_layers) == layout.num_layers
    for number, (context, continuation) in enumerate(texts, 1):
        ctx = torch.tensor([context], device=model.device)
        cont = torch.tensor([continuation], device=model.device)
        # Plain mixkv presses share one forward over the context, which also gives the full cache.
        shared = [key for key in reports if sharing[key[0]]]
        presses = {key: methods[key[0]].press(key[1], context_tokens=context_length) for key in reports}
        if shared and layout_shares:
            full, runs = _runs_sharing_one_prefill(model, ctx, cont, [presses[key] for key in shared])
            compressed = dict(zip(shared, runs, strict=True))
        else:
            full, compressed = _run(model, ctx, cont, None), {}
        for key in reports:
            variant = methods[key[0]]
            run = (
                compressed[key]
                if key in compressed
                else _run(model, ctx, cont, presses[key], variant.prefill_chunk_size)
            )
            reports[key].append(_compare(full, run, ctx, cont))
        log(f"text {number} of {len(texts)} done")
    return reports


def _rows(reports: Mapping[_Cell, list[FidelityReport]], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Per method x budget: mean top-1 agreement and KL with their bootstrap intervals, and the
    reports of every text."""
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
        log(
            f"{method:>24} budget {budget:>4}: top-1 agreement {top1[0]:.3f} [{top1[1]:.3f}, {top1[2]:.3f}], "
            f"mean KL {kl[0]:.3f} [{kl[1]:.3f}, {kl[2]:.3f}] (n = {len(found)} texts)"
        )
    return rows


def _comparisons(
    reports: Mapping[_Cell, list[FidelityReport]],
    methods: Mapping[str, MethodVariant],
    budgets: Sequence[int],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Paired comparisons on the same texts: each MixKV method against its base, each variant
    against its plain method."""
    names = list(methods)
    pairs = mixkv_base_pairs(names) + [
        (plain, m) for m in names if (plain := methods[m].press_method) != m and plain in methods
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
            log(line.rstrip(";"))
    return comparisons


def run_fidelity_sweep(
    model: Any,
    tokenizer: Any,
    *,
    methods: Mapping[str, MethodVariant],
    budgets: Sequence[int],
    context_length: int,
    texts: int,
    corpus: str,
    continuation_tokens: int,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict[str, Any]]]:
    """Top-1 agreement and KL of every method x budget on natural text (``mixkv fidelity``).

    Contexts are consecutive stretches of the Python standard library's documentation or of its
    functions' source code (offline, deterministic), each followed by a teacher-forced
    continuation of the same text. The plain mixkv presses of a text share one forward over its
    context, which also gives the full-cache reference (:func:`_runs_sharing_one_prefill`: the
    same figures as a prefill per press); variants and kvpress presses prefill on their own.

    Parameters
    ----------
    model, tokenizer
        A causal LM and its tokenizer.
    methods
        Method name -> its parsed variant (:func:`~mixkv.eval.runner.parse_method`), in the order
        of the rows; not ``full``.
    budgets
        Cache budgets (tokens).
    context_length
        Context tokens per text.
    texts
        How many different contexts.
    corpus
        ``"docs"`` (prose sentences of standard-library docstrings) or ``"source"`` (the source
        code of standard-library functions).
    continuation_tokens
        Teacher-forced tokens after each context.
    log
        Receives a line after every text, one per row and one per compared pair and budget.

    Returns
    -------
    dict
        ``"rows"``: per method x budget, the mean top-1 agreement and KL with their 95% bootstrap
        intervals over the texts and every text's :class:`FidelityReport` as a dict;
        ``"comparisons"``: each MixKV method against its base and each ``+chunkN`` / ``+decodeN``
        variant against its plain method, per budget and metric (paired-bootstrap interval of the
        difference, exact sign test).

    Raises
    ------
    ValueError
        If the corpus holds fewer than ``texts`` stretches of ``context_length +
        continuation_tokens`` tokens.
    """
    contexts = _corpus_texts(tokenizer, corpus, context_length, continuation_tokens, texts)
    reports = _measure_texts(model, contexts, methods, budgets, context_length, log)
    return {"rows": _rows(reports, log), "comparisons": _comparisons(reports, methods, budgets, log)}
