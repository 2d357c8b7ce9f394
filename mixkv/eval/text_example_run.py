"""How one example of the text grid runs: prefill (compressing under the press), decode, score.

Protocols
---------
``"query_agnostic"`` (default)
    Only the context is prefilled and compressed; the question arrives afterwards and is fed
    through the compressed cache. The press cannot know what will be asked.
``"query_aware"``
    The whole prompt (context and question, except its last token) is prefilled and compressed,
    so the observation window contains the question, as in the SnapKV / MixKV papers.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mixkv.eval.generation import (
    check_stackable,
    decode_together,
    eos_ids,
    greedy_with_positions,
    kv_fraction,
    report_fields,
)
from mixkv.eval.replay import RecordedPrefill, recording_attention_inputs, replayed_prefill
from mixkv.eval.text_example import TextExample, encode_prompt, score_output
from mixkv.integration.cache import kv_cache_bytes, token_bytes
from mixkv.integration.chat_prompts import pad_token_id
from mixkv.integration.decoder_layout import cache_argument, prefill, prefill_in_chunks
from mixkv.integration.kvpress_bridge import press_applied
from mixkv.integration.prompt_recording import RecordedPrompt

__all__ = [
    "PROTOCOLS",
    "SharedPrefix",
    "prefill_shared_prefix",
    "prompt_ids",
    "run_closed_book",
    "run_example",
    "run_examples_together",
]

PROTOCOLS = ("query_agnostic", "query_aware")


@dataclass(frozen=True)
class SharedPrefix:
    """The full cache of an example's first ``tokens`` prefill tokens, computed once and copied
    into every method's run (see :func:`prefill_shared_prefix` and, for images,
    :func:`mixkv.eval.mm_example_run.prefill_image_prefix`). Never modified.

    ``embeddings``: the whole prompt's input embeddings as the text decoder receives them, when the
    rest is fed as embeddings (a tail that starts inside an image); ``generation_state``: model
    attributes the continuation needs (:func:`mixkv.integration.decoder_layout.generation_state`);
    ``attention_inputs``: every attention module's keyword inputs, per forward, when recorded for
    a kvpress replay (:func:`mixkv.eval.replay.prefill_with_inputs`).
    """

    cache: Any
    tokens: int
    seconds: float
    embeddings: torch.Tensor | None = None
    generation_state: dict[str, Any] = field(default_factory=dict)
    attention_inputs: dict[torch.nn.Module, list[dict[str, Any]]] | None = None


def prompt_ids(
    example: TextExample, tokenizer: Any, protocol: str, device: torch.device
) -> tuple[torch.Tensor, int]:
    """The whole prompt ``(1, N)`` and how many of its tokens are prefilled under ``protocol``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    context_ids, question_ids = encode_prompt(example, tokenizer)
    ids = torch.tensor([context_ids + question_ids], dtype=torch.long, device=device)
    return ids, len(context_ids) if protocol == "query_agnostic" else ids.shape[1] - 1


def prefill_shared_prefix(
    model: Any,
    tokenizer: Any,
    example: TextExample,
    *,
    protocol: str,
    tail_tokens: int,
    record_inputs: bool = False,
) -> SharedPrefix | None:
    """Prefill all but the last ``tail_tokens`` prefill tokens of an example with the full cache.

    Every method then copies this cache and prefills only the tail under its press, which
    compresses prefix and tail together exactly as it would a one-go prefill (the scores only need
    the tail's last ``window_size`` queries). The prompt's long prefix is thus computed once per
    example instead of once per (method, budget). None when the prefill is not longer than the
    tail. ``record_inputs`` also keeps every attention module's inputs, from which
    :func:`~mixkv.eval.replay.prefill_with_inputs` completes the prefill for kvpress presses.
    """
    from transformers import DynamicCache

    ids, n_prefill = prompt_ids(example, tokenizer, protocol, model.device)
    tokens = n_prefill - tail_tokens
    if tokens < 1:
        return None
    cache = DynamicCache(config=model.config)
    recording = recording_attention_inputs(model) if record_inputs else contextlib.nullcontext()
    with torch.inference_mode(), recording as recorded:
        start = time.perf_counter()
        prefill(model, ids[:, :tokens], cache)
        seconds = time.perf_counter() - start
    return SharedPrefix(cache, tokens, seconds, attention_inputs=recorded)


def run_example(
    model: Any,
    tokenizer: Any,
    example: TextExample,
    press: Any | None,
    *,
    protocol: str = "query_agnostic",
    max_new_tokens: int | None = None,
    prefix: SharedPrefix | None = None,
    prefill_chunk_size: int | None = None,
    recorded: RecordedPrefill | None = None,
) -> dict[str, Any]:
    """Prefill one example (compressing with ``press``), decode the answer and score it.

    Parameters
    ----------
    model, tokenizer
        A causal LM and its tokenizer.
    example
        The example.
    press
        A press, or None for the full cache.
    protocol
        ``"query_agnostic"`` or ``"query_aware"`` (see the module documentation).
    max_new_tokens
        Overrides ``example.max_new_tokens``.
    prefix
        This example's :func:`prefill_shared_prefix`: a copy of its cache is used and only the rest
        of the prefill runs under the press (mixkv presses only: kvpress compresses only a prefill
        that starts at position 0).
    prefill_chunk_size
        Prefill the prompt in chunks of this many tokens inside the press's
        :meth:`~mixkv.integration.session.PressSession.chunked_prefill`, so it is compressed as it
        goes (a mixkv press, no ``prefix``). None: one forward.
    recorded
        For a kvpress press: this example's full-cache prefill with every attention module's inputs
        (:func:`~mixkv.eval.replay.prefill_with_inputs`). The press's hooks are run on a copy of it
        (:func:`~mixkv.eval.replay.replayed_prefill`) instead of a new prefill; ``prefill_seconds``
        is then the recorded prefill's time plus the hooks'.

    Returns
    -------
    dict
        JSON-serialisable record: output, score, token counts, timings (``prefill_seconds`` includes
        compression and the shared prefix's own time; ``decode_seconds`` covers the question and
        the generated tokens), KV bytes
        after prefill (``kv_bytes``), after decoding (``kv_bytes_after_decoding``) and what the full
        cache would hold (``kv_bytes_full``), mean kept tokens per KV head and the press's report
        (under a :class:`~mixkv.DecodingPress` also ``decoding_compressions``, the layer
        compressions done after the prompt).
    """
    from transformers import DynamicCache

    from mixkv.presses.base import BasePress
    from mixkv.presses.decoding import DecodingPress

    # A press from another library (kvpress): no report, no prefix, and its cache reports kept entries.
    foreign = press is not None and not isinstance(press, (BasePress, DecodingPress))
    if prefix is not None and foreign:
        raise ValueError(
            f"{type(press).__name__} cannot continue from a shared prefix (only mixkv presses compress a "
            "cache that already holds one); pass prefix=None"
        )
    if recorded is not None and not foreign:
        raise ValueError(
            "recorded is for presses from another library (kvpress); mixkv presses continue from a shared "
            "prefix (prefix=...) and the full cache needs neither"
        )
    if prefill_chunk_size is not None and (press is None or foreign or prefix is not None):
        raise ValueError(
            "prefill_chunk_size needs a mixkv press and no shared prefix (the chunks are compressed as they "
            "come, from position 0)"
        )
    compressions_before = press.compressions if isinstance(press, DecodingPress) else 0
    ids, n_prefill = prompt_ids(example, tokenizer, protocol, model.device)
    start_at = 0 if prefix is None else prefix.tokens
    cache = DynamicCache(config=model.config) if prefix is None else copy.deepcopy(prefix.cache)
    new_tokens = max_new_tokens if max_new_tokens is not None else example.max_new_tokens
    pad = pad_token_id(tokenizer)
    if recorded is not None and recorded.tokens != n_prefill:
        raise ValueError(
            f"recorded holds {recorded.tokens} prefill tokens but this example prefills {n_prefill} under "
            f"protocol {protocol!r}; record the prefill of this example and protocol"
        )
    if recorded is not None:
        manager: Any = replayed_prefill(model, press, recorded)
    else:
        manager = press_applied(press, model)
    with torch.inference_mode(), manager as entered:
        if recorded is not None:
            cache, hooks_seconds = entered
            prefill_s = recorded.seconds + hooks_seconds
        else:
            if prefix is not None and entered is not None:
                entered.declare_prompt(cache, ids[:, :n_prefill])  # KVzip reconstructs the whole prompt
            prefill_s = _prefill_prompt(model, ids, n_prefill, cache, prefix, prefill_chunk_size, entered)
            if press is not None and getattr(press, "last_reconstruction_reused", False):
                prefill_s += press.last_reconstruction_seconds  # what the reused reconstruction took
        kept_bytes = kv_cache_bytes(cache)
        held = _held_by_foreign_cache(cache, n_prefill, kept_bytes) if foreign else {}
        start = time.perf_counter()
        if not foreign:
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **{cache_argument(model): cache},
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            generated = out[0, ids.shape[1] :]
        else:
            generated = greedy_with_positions(
                model, cache, ids, n_prefill, new_tokens, eos_ids(model, tokenizer)
            )
        decode_s = time.perf_counter() - start
        bytes_after_decoding = kv_cache_bytes(cache)
    report = getattr(press, "last_report", None) if press is not None else None
    record = _record(
        example,
        tokenizer,
        ids,
        n_prefill,
        start_at,
        generated,
        prefill_s=prefill_s,
        decode_s=decode_s,
        kept_bytes=kept_bytes,
        bytes_after_decoding=bytes_after_decoding,
        report=report,
    )
    if recorded is not None:
        record["prefill_replayed"] = True
    if isinstance(press, DecodingPress):
        record["decoding_compressions"] = press.compressions - compressions_before
    record.update(held)
    return record


def run_closed_book(
    model: Any,
    tokenizer: Any,
    example: TextExample,
    *,
    protocol: str = "query_agnostic",
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Ask ``example``'s question without its context, with the full cache: the grid's
    ``closed-book`` method.

    What the model answers from memory or guesses (a 7-digit needle cannot be guessed; the default
    of a standard-library parameter may be remembered by a model trained on code) is the floor a
    press must beat before it can be said to have read anything. The record is
    :func:`run_example`'s on the example with an empty context, identified as ``example`` (its
    ``example_sha1``, ``context_sha1`` and ``context_tokens``, so it is checkpointed and paired
    with the other methods' records of the same example) and marked ``closed_book``. With no
    context there is nothing to compress before the question, so the prompt is prefilled as under
    ``query_aware`` whatever ``protocol`` is (both give the same answer); ``protocol`` sets
    ``kv_bytes_full``, what the whole prompt's prefill would hold under it, of which
    ``kv_fraction`` is the question's share.
    """
    record = run_example(
        model,
        tokenizer,
        replace(example, context="", context_tokens=0),
        None,
        protocol="query_aware",
        max_new_tokens=max_new_tokens,
    )
    _, full_prefill = prompt_ids(example, tokenizer, protocol, model.device)
    bytes_per_token = record["kv_bytes"] / record["prefill_tokens"]
    record.update(
        context_tokens=example.context_tokens,
        context_sha1=hashlib.sha1(example.context.encode()).hexdigest(),
        example_sha1=example.digest,
        kv_bytes_full=round(bytes_per_token * full_prefill),
        closed_book=True,
    )
    record["kv_fraction"] = record["kv_bytes"] / record["kv_bytes_full"]
    return record


def _held_by_foreign_cache(cache: Any, n_prefill: int, kept_bytes: int) -> dict[str, Any]:
    """What the cache a press from another library (kvpress) left after the prefill holds, for the
    record (mixkv presses report it): the full cache's bytes, mean kept entries per layer and the
    kept fraction."""
    held = [layer for layer in cache.layers if isinstance(getattr(layer, "keys", None), torch.Tensor)]
    full_bytes = int(n_prefill * sum(token_bytes(layer) for layer in held))
    return {
        "kv_bytes_full": full_bytes,
        "kept_tokens_mean": sum(layer.keys.shape[2] for layer in held) / max(len(held), 1),
        "kv_fraction": kept_bytes / full_bytes if full_bytes else 1.0,
    }


def run_examples_together(
    model: Any,
    tokenizer: Any,
    example: TextExample,
    presses: Sequence[Any],
    *,
    protocol: str = "query_agnostic",
    max_new_tokens: int | None = None,
    prefix: SharedPrefix | None = None,
    prefill_chunk_sizes: Sequence[int | None] | None = None,
    seed: int | None = None,
    recorded: RecordedPrefill | None = None,
) -> list[dict[str, Any]]:
    """:func:`run_example` for several presses on one example, their answers decoded as one batch:
    one record per press, in order.

    Each press compresses exactly as in :func:`run_example` (from a copy of ``prefix``, or from
    position 0 in chunks of its ``prefill_chunk_sizes`` entry). The prompt forward is the same
    under every mixkv press (each compresses a layer after it has attended), so only the first
    press that prefills in one forward runs it, recording it
    (:meth:`~mixkv.integration.session.PressSession.recording_prompt`); the other such presses
    compress that recording (:meth:`~mixkv.integration.session.PressSession.compress_recorded`,
    the same selection entry for entry), and their records say ``prefill_replayed``, with
    ``prefill_seconds`` the recorded forward's time plus their own compression. None (the full
    cache) continues a copy of ``prefix``; a kvpress press is replayed on ``recorded`` as in
    :func:`run_example`, and joins only if it leaves a plain shortened cache (its head-wise
    presses mask keys while decoding: run those with :func:`run_example`). The caches are then
    stacked as the rows of one batch (:func:`~mixkv.integration.cache.stack_layers`) and answered
    greedily together: a decoding step reads the weights once for all presses instead of once per
    press, which is most of a press's cost on a CPU. Outputs equal :func:`run_example`'s up to the
    float rounding of batched matrix products. ``decode_seconds`` is the batch's decoding time
    divided by the number of presses (``decode_batch`` in every record);
    ``kv_bytes_after_decoding`` is what the press's own cache would hold after its answer.

    Parameters
    ----------
    seed
        Re-seed torch before each press's prefill (a random press draws then), as a loop of
        :func:`run_example` calls preceded by ``torch.manual_seed(seed)`` does.
    recorded
        This example's full-cache prefill with every attention module's inputs, for the kvpress
        presses (:func:`~mixkv.eval.replay.prefill_with_inputs`).

    Raises
    ------
    ValueError
        No plain mixkv press among ``presses`` (the batch is decoded in one's session), a
        :class:`~mixkv.DecodingPress`, a kvpress press without ``recorded`` or that masks keys, a
        full cache without ``prefix``, a model with sliding-window layers (their caches evict as
        they grow), or ``prefill_chunk_sizes`` of another length than ``presses``.
    """
    from transformers import DynamicCache

    from mixkv.integration.kvpress_bridge import kvpress_masks_keys
    from mixkv.presses.base import BasePress
    from mixkv.presses.decoding import DecodingPress

    if not presses:
        return []
    ours = [press for press in presses if isinstance(press, BasePress)]
    if not ours or any(isinstance(press, DecodingPress) for press in presses):
        raise ValueError(
            "run_examples_together decodes in a plain mixkv press's session: pass at least one, and no "
            "DecodingPress (run that with run_example)"
        )
    if any(press is None for press in presses) and prefix is None:
        raise ValueError(
            "the full cache (None) joins the batch by continuing the shared prefix: pass prefix=..."
        )
    check_stackable(model, "run_example")
    chunks = [None] * len(presses) if prefill_chunk_sizes is None else list(prefill_chunk_sizes)
    if len(chunks) != len(presses):
        raise ValueError(f"prefill_chunk_sizes has {len(chunks)} entries for {len(presses)} presses")
    ids, n_prefill = prompt_ids(example, tokenizer, protocol, model.device)
    new_tokens = max_new_tokens if max_new_tokens is not None else example.max_new_tokens
    rows: list[list[Any]] = []
    started: list[dict[str, Any]] = []
    # The first one-forward press records its forward; the others compress that recording.
    window = max(
        (
            p.window_size
            for p, chunk in zip(presses, chunks, strict=True)
            if isinstance(p, BasePress) and chunk is None
        ),
        default=0,
    )
    recording: RecordedPrompt | None = None
    forward_s = 0.0
    for press, chunk in zip(presses, chunks, strict=True):
        if seed is not None:
            torch.manual_seed(seed)
        start_from = prefix if chunk is None else None
        replayed = foreign = False
        if press is None:  # the full cache: the prompt's rest after a copy of the prefix
            cache = copy.deepcopy(prefix.cache)  # type: ignore[union-attr]
            with torch.inference_mode():
                prefill_s = _prefill_prompt(model, ids, n_prefill, cache, prefix, None, None)
        elif not isinstance(press, BasePress):  # kvpress: its hooks replayed on the recorded prefill
            if recorded is None or recorded.tokens != n_prefill:
                raise ValueError(
                    f"{type(press).__name__} is replayed on this example's recorded full-cache prefill: pass "
                    "recorded=prefill_with_inputs(...) of this example and protocol"
                )
            start_from, replayed, foreign = None, True, True
            with torch.inference_mode(), replayed_prefill(model, press, recorded) as (cache, hooks_seconds):
                if kvpress_masks_keys(model):
                    raise ValueError(
                        f"{type(press).__name__} masks keys while decoding (a head-wise kvpress press); decode it "
                        "on its own with run_example"
                    )
                prefill_s = recorded.seconds + hooks_seconds
        else:
            replayed = chunk is None and recording is not None
            with torch.inference_mode(), press_applied(press, model) as session:
                if replayed:
                    start = time.perf_counter()
                    cache = session.compress_recorded(recording)
                    prefill_s = forward_s + time.perf_counter() - start
                else:
                    cache = (
                        DynamicCache(config=model.config)
                        if start_from is None
                        else copy.deepcopy(start_from.cache)
                    )
                    recorder = session.recording_prompt(window) if chunk is None else contextlib.nullcontext()
                    with recorder as recorded_now:
                        prefill_s = _prefill_prompt(model, ids, n_prefill, cache, start_from, chunk, session)
                    if chunk is None:
                        recording = recorded_now
                        report = press.last_report
                        forward_s = prefill_s - (report.compression_seconds if report is not None else 0.0)
        rows.append(list(cache.layers))
        kept_bytes = kv_cache_bytes(cache)
        started.append(
            {
                "start_at": 0 if start_from is None else start_from.tokens,
                "prefill_s": prefill_s,
                "replayed": replayed,
                "kept_bytes": kept_bytes,
                "bytes_per_token": sum(token_bytes(layer) for layer in cache.layers),
                "report": press.last_report if isinstance(press, BasePress) else None,
                "held": _held_by_foreign_cache(cache, n_prefill, kept_bytes) if foreign else {},
            }
        )
    del recording
    generated, decode_s = decode_together(
        model, rows, ids, n_prefill, new_tokens, eos_ids(model, tokenizer), ours[0]
    )
    records = []
    for row, out in zip(started, generated, strict=True):
        fed = ids.shape[1] - n_prefill + max(len(out) - 1, 0)  # the last new token is never fed
        record = _record(
            example,
            tokenizer,
            ids,
            n_prefill,
            row["start_at"],
            torch.tensor(out, dtype=torch.long),
            prefill_s=row["prefill_s"],
            decode_s=decode_s,
            kept_bytes=row["kept_bytes"],
            bytes_after_decoding=row["kept_bytes"] + fed * row["bytes_per_token"],
            report=row["report"],
        )
        record.update(row["held"])
        record["decode_batch"] = len(presses)
        if row["replayed"]:
            record["prefill_replayed"] = True
        records.append(record)
    return records


def _prefill_prompt(
    model: Any,
    ids: torch.Tensor,
    n_prefill: int,
    cache: Any,
    prefix: SharedPrefix | None,
    chunk_size: int | None,
    session: Any,
) -> float:
    """Prefill the prompt's first ``n_prefill`` tokens into ``cache``: what follows the shared
    ``prefix`` it already holds in one forward, or (``chunk_size``) all of them in chunks compressed
    as they come under ``session``. Returns the seconds, the prefix's own included."""
    start = time.perf_counter()
    if chunk_size is None:
        prefill(model, ids[:, (0 if prefix is None else prefix.tokens) : n_prefill], cache)
    else:
        prefill_in_chunks(model, ids[:, :n_prefill], cache, chunk_size, session)
    return time.perf_counter() - start + (0.0 if prefix is None else prefix.seconds)


def _record(
    example: TextExample,
    tokenizer: Any,
    ids: torch.Tensor,
    n_prefill: int,
    start_at: int,
    generated: torch.Tensor,
    *,
    prefill_s: float,
    decode_s: float,
    kept_bytes: int,
    bytes_after_decoding: int,
    report: Any,
) -> dict[str, Any]:
    """One example's record (see :func:`run_example`); ``report``: a mixkv press's, or None."""
    text = tokenizer.decode(generated, skip_special_tokens=True)
    record: dict[str, Any] = {
        "question": example.question,
        "answers": list(example.answers),
        "metric": example.metric,
        "output": text,
        "score": score_output(text, example.answers, example.metric),
        "context_tokens": example.context_tokens,
        "prefill_tokens": int(n_prefill),
        "shared_prefix_tokens": start_at,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": int(generated.numel()),
        "context_sha1": hashlib.sha1(example.context.encode()).hexdigest(),
        "example_sha1": example.digest,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "kv_bytes": kept_bytes,
        "kv_bytes_full": kept_bytes,
        "kv_bytes_after_decoding": bytes_after_decoding,
        "kept_tokens_mean": float(n_prefill),
        "compression_seconds": 0.0,
        "report": None,
    }
    if report is not None:
        record.update(report_fields(report))
        to_dict = getattr(report, "to_dict", None)
        record["report"] = to_dict() if callable(to_dict) else None
    record["kv_fraction"] = kv_fraction(record)
    return record
