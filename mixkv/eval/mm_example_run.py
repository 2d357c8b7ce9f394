"""How one example of the multimodal grid runs: its prompt, its inputs, generation under a press, score.

* the prompt is built by the model's own processor (:func:`~mixkv.integration.chat_prompts.build_mm_prompt`:
  the chat template over one user turn with an image or video entry and the question, or the
  processor's placeholder, a newline and the question), followed by the example's answer prefix;
* an image example's image, or a video example's frames (``videos=[frames]``, which needs the
  processor's video processor), go to the processor, which expands the placeholder;
* the answer is generated greedily with ``model.generate`` under the press, so the whole prompt
  (visual tokens and question) is prefilled and compressed at once (the text grid's
  ``query_aware`` protocol), optionally after a shared full-cache prefix
  (:func:`prefill_image_prefix`);
* the output is scored with :func:`~mixkv.eval.mm_example.score_examples`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version

from mixkv.eval.generation import check_stackable, decode_together, eos_ids, kv_fraction, report_fields
from mixkv.eval.mm_example import MMExample, score_examples
from mixkv.eval.text_example_run import SharedPrefix
from mixkv.integration.cache import kv_cache_bytes
from mixkv.integration.chat_prompts import build_mm_prompt, pad_token_id, tokenizer_of
from mixkv.integration.decoder_layout import (
    PER_TOKEN_IMAGE_INPUTS,
    cache_argument,
    find_cache,
    generation_state,
    placeholder_token_id,
    prefill,
    reads_images_as_text,
    restore_generation_state,
)
from mixkv.integration.kvpress_bridge import press_applied
from mixkv.integration.prompt_recording import RecordedPrompt
from mixkv.presses.base import BasePress

__all__ = [
    "DEFAULT_NEW_TOKENS",
    "decoder_inputs",
    "encode_example",
    "example_prompt",
    "prefill_image_prefix",
    "primary_score",
    "run_mm_example",
    "run_mm_examples_together",
]

#: Generated tokens per example by metric (``max_new_tokens`` overrides).
DEFAULT_NEW_TOKENS: dict[str, int] = {
    "anls": 24,
    "vqa_accuracy": 16,
    "relaxed_accuracy": 16,
    "ocrbench": 24,
    "cider_d": 40,
    "point_in_box": 24,
    "multiple_choice": 8,
    "exact_match": 10,
    "mark_in_box": 4,
    "numbers_recall": 24,
}


def _placeholder_counts(model: Any, input_ids: torch.Tensor) -> tuple[int, int]:
    """(image, video) placeholder tokens of a prompt, by the model's placeholder ids."""
    counts = []
    for kind in ("image", "video"):
        token_id = placeholder_token_id(model.config, kind)
        counts.append(int((input_ids == token_id).sum()) if token_id is not None else 0)
    return counts[0], counts[1]


def primary_score(scores: dict[str, float]) -> float:
    """One number of :func:`~mixkv.eval.mm_example.score_examples`'s scores: their mean, without
    OCRBench's count of correct answers."""
    values = [v for k, v in scores.items() if k != "ocrbench_correct"]
    return sum(values) / len(values)


def run_mm_example(
    model: Any,
    processor: Any,
    example: MMExample,
    press: Any | None,
    *,
    max_new_tokens: int | None = None,
    coordinate_scale: str = "pixel",
    inputs: dict[str, Any] | None = None,
    prefix: SharedPrefix | None = None,
    prompt_embeddings: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Generate an answer for one example under ``press`` (None: full cache) and score it.

    With ``prefix`` (this example's :func:`prefill_image_prefix`, mixkv presses only) a copy of its
    cache is used: ``generate`` prefills only the prompt's tail (as ids, or as embeddings when it
    starts inside the image), under the press, which compresses prefix and tail together as it
    would a one-go prefill. ``prompt_embeddings`` (:func:`decoder_inputs` of the prompt) goes with
    the prompt's ids to a KVzip press continuing ``prefix``, whose repeat reads the images again.

    Returns
    -------
    dict
        JSON-serialisable record: prompt, output, score, token counts (``image_tokens`` counted in
        the prompt, ``shared_prefix_tokens``: 0 for a one-go prefill), timings
        (``prefill_seconds``: the first forward pass, compression included, plus the shared
        prefix's own time; ``decode_seconds``: the rest of ``generate``), KV bytes right after prefill (``kv_bytes``)
        and without compression (``kv_bytes_full``), ``kv_fraction``, mean kept tokens per KV head,
        ``image_tokens_total`` / ``image_tokens_kept`` and the press's report.
    """
    prompt = example_prompt(processor, example)
    if inputs is None:
        inputs = encode_example(processor, example, prompt, model.device)
    ids = inputs["input_ids"]
    n_prompt = int(ids.shape[1])
    new_tokens = max_new_tokens or DEFAULT_NEW_TOKENS.get(example.metric, 24)
    pad = pad_token_id(processor)

    prefill: dict[str, Any] = {"depth": 0}

    # The first forward that is not inside another (KVzip's repeat forwards run in the prompt's).
    def before(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        prefill["depth"] += 1
        if "start" not in prefill:
            prefill["start"] = time.perf_counter()

    def after(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        prefill["depth"] -= 1
        if "bytes" not in prefill and prefill["depth"] == 0:
            prefill["seconds"] = time.perf_counter() - prefill["start"]
            cache = find_cache(output, kwargs)
            prefill["bytes"] = kv_cache_bytes(cache) if cache is not None else 0

    handles: list[Any] = []
    generate_inputs = inputs
    cache = None
    if prefix is not None:
        if press is not None and not isinstance(press, BasePress):
            raise ValueError(
                f"{type(press).__name__} cannot continue from a shared prefix (only mixkv presses compress a "
                "cache that already holds one); pass prefix=None"
            )
        cache = copy.deepcopy(prefix.cache)
        restore_generation_state(model, prefix.generation_state)
        generate_inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            cache_argument(model): cache,
        }
    manager = press_applied(press, model)
    try:
        with torch.inference_mode(), manager as session:
            # Registered after the press's own hooks, so the prefill's time and KV bytes include
            # what the press does after the prompt's forward (KVzip's reconstruction).
            handles = [
                model.register_forward_pre_hook(before, with_kwargs=True),
                model.register_forward_hook(after, with_kwargs=True),
            ]
            if session is not None and cache is not None:
                session.declare_prompt(cache, ids, prompt_embeddings)
            start = time.perf_counter()
            if prefix is not None and prefix.embeddings is not None:
                # A rest starting inside the image goes in as embeddings, in a forward of its own
                # (transformers 5.2's generate cannot continue a cache from embeddings); generate
                # then continues from the first answer token, as ids.
                first = _tail_forward(model, ids, prefix, cache).argmax(-1, keepdim=True)
                out = torch.cat([ids, first], dim=1)
                if new_tokens > 1 and int(first) not in _generation_eos(model):
                    out = model.generate(
                        input_ids=out,
                        attention_mask=torch.ones_like(out),
                        **{cache_argument(model): cache},
                        max_new_tokens=new_tokens - 1,
                        do_sample=False,
                        pad_token_id=pad,
                    )
            else:
                out = model.generate(
                    **generate_inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
                )
            total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    prefix_seconds = 0.0 if prefix is None else prefix.seconds
    if press is not None and getattr(press, "last_reconstruction_reused", False):
        prefix_seconds += press.last_reconstruction_seconds  # what the reused reconstruction took
    report = getattr(press, "last_report", None) if press is not None else None
    return _mm_record(
        model,
        example,
        processor,
        prompt,
        ids,
        out[0, n_prompt:],
        report=report,
        kv_bytes=int(prefill.get("bytes", 0)),
        prefill_s=float(prefill.get("seconds", 0.0)) + prefix_seconds,
        decode_s=total - float(prefill.get("seconds", 0.0)),
        shared_prefix_tokens=0 if prefix is None else prefix.tokens,
        coordinate_scale=coordinate_scale,
    )


def run_mm_examples_together(
    model: Any,
    processor: Any,
    example: MMExample,
    presses: Sequence[Any],
    *,
    inputs: dict[str, Any],
    prefix: SharedPrefix,
    max_new_tokens: int | None = None,
    coordinate_scale: str = "pixel",
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """:func:`run_mm_example` for several presses (None: the full cache) on one example, each
    continuing a copy of ``prefix``, their answers decoded as one batch: one record per press, in
    order.

    A press compresses each layer after attending over the whole prompt, so the tail's forward is
    the same under every press: the first mixkv press runs it, recording it
    (:meth:`~mixkv.integration.session.PressSession.recording_prompt`), and the others compress
    that recording (:meth:`~mixkv.integration.session.PressSession.compress_recorded`, the same
    selection entry for entry; their records say ``prefill_replayed`` and their
    ``prefill_seconds`` are the recorded forward's plus their own compression). For the same
    reason the prompt's last logits, hence the first answer token, are the same for every press.
    The caches are then stacked and the rest of the answers decoded together
    (:func:`~mixkv.eval.generation.decode_together`); ``decode_seconds`` is the batch's time per
    press (``decode_batch`` in every record). Answers equal :func:`run_mm_example`'s up to the
    float rounding of batched matrix products.

    Raises
    ------
    ValueError
        No mixkv press among ``presses``; a press that cannot continue a prefix or be replayed
        (kvpress presses and scorers, KVzip, :class:`~mixkv.DecodingPress`); a ``prefix`` that keeps
        M-RoPE offsets (the batch's decoding positions are 1-D); a model with sliding-window layers
        (their caches evict as they grow).
    """

    ours = [press for press in presses if isinstance(press, BasePress)]
    if not ours:
        raise ValueError(
            "run_mm_examples_together decodes in a mixkv press's session: pass at least one mixkv press"
        )
    foreign = [press for press in presses if press is not None and not isinstance(press, BasePress)]
    whole = [p for p in ours if p.needs_layer_inputs or getattr(p, "needs_reconstruction", False)]
    if foreign or whole:
        names = ", ".join(type(p).__name__ for p in (*foreign, *whole))
        raise ValueError(
            f"{names} cannot join a batch that continues a shared prefix (it prefills the whole prompt "
            "itself, or is not a plain mixkv press); run it with run_mm_example"
        )
    if prefix.generation_state:
        raise ValueError(
            "this prefix's model keeps M-RoPE offsets (Qwen-VL); the batch decodes at 1-D positions: run "
            "each press with run_mm_example"
        )
    check_stackable(model, "run_mm_example")
    prompt = example_prompt(processor, example)
    ids = inputs["input_ids"]
    n_prompt = int(ids.shape[1])
    new_tokens = max_new_tokens or DEFAULT_NEW_TOKENS.get(example.metric, 24)
    window = max(press.window_size for press in ours)
    rows: list[list[Any]] = []
    started: list[dict[str, Any]] = []
    recording: RecordedPrompt | None = None
    last_logits: torch.Tensor | None = None
    forward_s = 0.0
    for press in presses:
        if seed is not None:
            torch.manual_seed(seed)
        replayed = False
        if press is None:
            cache = copy.deepcopy(prefix.cache)
            with torch.inference_mode():
                start = time.perf_counter()
                last_logits = _tail_forward(model, ids, prefix, cache)
                prefill_s = time.perf_counter() - start + prefix.seconds
        else:
            with torch.inference_mode(), press_applied(press, model) as session:
                replayed = recording is not None
                start = time.perf_counter()
                if recording is not None:
                    cache = session.compress_recorded(recording)
                    prefill_s = forward_s + time.perf_counter() - start
                else:
                    cache = copy.deepcopy(prefix.cache)
                    session.declare_prompt(cache, ids)
                    with session.recording_prompt(window) as recording_now:
                        last_logits = _tail_forward(model, ids, prefix, cache)
                    prefill_s = time.perf_counter() - start + prefix.seconds
                    recording = recording_now
                    forward_s = prefill_s - press.last_report.compression_seconds
        report = press.last_report if press is not None else None
        rows.append(list(cache.layers))
        started.append(
            {"prefill_s": prefill_s, "replayed": replayed, "report": report, "bytes": kv_cache_bytes(cache)}
        )
    del recording
    assert last_logits is not None  # a mixkv press ran the tail's forward unless the full cache did
    first = int(last_logits[0].argmax())
    eos = eos_ids(model, tokenizer_of(processor))
    answers: list[list[int]] = [[] for _ in presses]
    decode_s = 0.0
    if first not in eos and new_tokens > 1:
        answers, decode_s = decode_together(
            model,
            rows,
            torch.cat([ids, ids.new_tensor([[first]])], dim=1),
            n_prompt,
            new_tokens - 1,
            eos,
            ours[0],
        )
    records = []
    for row, rest in zip(started, answers, strict=True):
        record = _mm_record(
            model,
            example,
            processor,
            prompt,
            ids,
            torch.tensor([first, *rest], dtype=torch.long),
            report=row["report"],
            kv_bytes=row["bytes"],
            prefill_s=row["prefill_s"],
            decode_s=decode_s,
            shared_prefix_tokens=prefix.tokens,
            coordinate_scale=coordinate_scale,
        )
        record["decode_batch"] = len(presses)
        if row["replayed"]:
            record["prefill_replayed"] = True
        records.append(record)
    return records


def _generation_eos(model: Any) -> set[int]:
    """The ids at which ``generate`` stops: the model's generation config's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(ids) if isinstance(ids, list) else ({int(ids)} if ids is not None else set())


def _tail_forward(model: Any, ids: torch.Tensor, prefix: SharedPrefix, cache: Any) -> torch.Tensor:
    """The prompt's rest after ``prefix`` through ``cache`` (as ids, or as the prefix's embeddings
    when the rest starts inside an image); returns the last position's logits ``(1, vocab)``."""
    if prefix.embeddings is None:
        return prefill(model, ids[:, prefix.tokens :], cache)
    rest = prefix.embeddings[:, prefix.tokens :]
    return model(inputs_embeds=rest, use_cache=True, **{cache_argument(model): cache}).logits[:, -1]


def _mm_record(
    model: Any,
    example: MMExample,
    processor: Any,
    prompt: str,
    ids: torch.Tensor,
    generated: torch.Tensor,
    *,
    report: Any,
    kv_bytes: int,
    prefill_s: float,
    decode_s: float,
    shared_prefix_tokens: int,
    coordinate_scale: str,
) -> dict[str, Any]:
    """One example's record (see :func:`run_mm_example`); ``report``: a mixkv press's, or None
    (``kv_bytes``, what the cache held after the prompt, is then the record's)."""
    n_prompt = int(ids.shape[1])
    text = str(tokenizer_of(processor).decode(generated, skip_special_tokens=True)).strip()
    n_image, n_video = _placeholder_counts(model, ids[0])
    record: dict[str, Any] = {
        "id": example.id,
        "image": str(example.image_path),
        "images": 0 if example.is_video else len(example.image_paths),
        "frames": len(example.frames),
        "question": example.question,
        "answers": list(example.answers),
        "metric": example.metric,
        "prompt": prompt,
        "output": text,
        "score": primary_score(score_examples([example], [text], coordinate_scale=coordinate_scale)),
        "prompt_tokens": n_prompt,
        "image_tokens": n_image,
        "video_tokens": n_video,
        "new_tokens": int(generated.numel()),
        "shared_prefix_tokens": shared_prefix_tokens,
        "compressed": report is not None,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "kv_bytes": kv_bytes,
        "kv_bytes_full": kv_bytes,
        "kept_tokens_mean": float(n_prompt),
        "compression_seconds": 0.0,
        "image_tokens_total": n_image,
        "image_tokens_kept": float(n_image),
        "video_tokens_total": n_video,
        "video_tokens_kept": float(n_video),
        "report": None,
    }
    if report is not None:
        record["kv_bytes"] = int(report.compressed_bytes)
        record.update(report_fields(report))
        if report.image_tokens_total is not None:
            record["image_tokens_total"] = int(report.image_tokens_total[0])
        if report.image_tokens_kept is not None:
            record["image_tokens_kept"] = float(report.image_tokens_kept[0])
        if report.video_tokens_total is not None:
            record["video_tokens_total"] = int(report.video_tokens_total[0])
        if report.video_tokens_kept is not None:
            record["video_tokens_kept"] = float(report.video_tokens_kept[0])
        record["report"] = report.to_dict()
    record["kv_fraction"] = kv_fraction(record)
    return record


def example_prompt(processor: Any, example: MMExample) -> str:
    """The example's prompt text: its question after one placeholder per image (or one video placeholder),
    then its answer prefix."""
    if example.is_video:
        prompt = build_mm_prompt(processor, example.question, "video")[0]
    else:
        prompt = build_mm_prompt(processor, example.question, "image", len(example.image_paths))[0]
    return prompt + example.answer_prefix


def _open_rgb(path: Path, example: MMExample) -> Any:
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"Image file {path} of example {example.id!r} not found.")
    with Image.open(path) as im:
        return im.convert("RGB")


def encode_example(
    processor: Any, example: MMExample, prompt: str, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """The processor's tensors for ``prompt`` with the example's images, or its frames as one video,
    on ``device`` (ValueError when the processor has no video processor)."""
    if example.is_video:
        if getattr(processor, "video_processor", None) is None:
            raise ValueError(
                f"{type(processor).__name__} has no video processor, so video example {example.id!r} cannot "
                "be encoded (transformers' video processors need torchvision); evaluate image tasks only"
            )
        frames = [_open_rgb(frame, example) for frame in example.frames]
        batch = processor(text=[prompt], videos=[frames], return_tensors="pt")
    else:
        images = [_open_rgb(path, example) for path in example.image_paths]
        batch = processor(text=[prompt], images=images, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


class _DecoderReached(Exception):
    pass


def decoder_inputs(model: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The prompt's input embeddings as the text decoder receives them, image features merged in;
    the forward stops there (only the vision side runs)."""
    captured: dict[str, torch.Tensor] = {}

    def stop(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        captured["embeddings"] = kwargs["inputs_embeds"]
        raise _DecoderReached

    handle = model.get_decoder().register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False)
    except _DecoderReached:
        pass
    finally:
        handle.remove()
    if "embeddings" not in captured:
        raise ValueError(f"{type(model).__name__} never called its text decoder with inputs_embeds")
    return captured["embeddings"]


#: The first transformers release tested to continue an M-RoPE (Qwen-VL) prompt from a prefix at its
#: true positions: 5.2 builds a continued forward's positions from the whole prompt's attention mask
#: and answers wrongly (tests/test_mm_runner.py); releases between were not tested.
_M_ROPE_CONTINUES_FROM = Version("5.25")


def prefill_image_prefix(model: Any, inputs: Mapping[str, Any], tail_tokens: int) -> SharedPrefix | None:
    """Prefill all but the last ``tail_tokens`` tokens of an encoded one-example prompt with the
    full cache.

    Every press then copies this cache and prefills only the tail (see :func:`run_mm_example`); a
    press scores only the tail's last ``window_size`` queries, so with ``tail_tokens >=
    window_size`` this is the one-go computation up to the float rounding of a forward split in
    two. A tail that holds image tokens (a question shorter than the tail after the image) is fed
    as embeddings; that split is exact only where image tokens attend causally at 1-D positions,
    so models with M-RoPE (Qwen-VL) or bidirectional image attention (Gemma 3) share nothing
    then. None when nothing is shared: also for a batch, a prompt not 2 tokens longer than the
    tail, or an M-RoPE model under transformers before 5.25 (which continues such a prompt at
    wrong positions).
    """
    from transformers import DynamicCache

    ids = inputs["input_ids"]
    tokens = int(ids.shape[1]) - tail_tokens
    if ids.shape[0] != 1 or tokens < 2:
        return None
    inner: Any = getattr(model, "model", None)
    if hasattr(inner, "rope_deltas") and Version(transformers.__version__) < _M_ROPE_CONTINUES_FROM:
        return None
    start = time.perf_counter()
    embeddings = None
    if sum(_placeholder_counts(model, ids[0, tokens:])) > 0:
        if not reads_images_as_text(model, inputs):
            return None
        embeddings = decoder_inputs(model, inputs)
    cache = DynamicCache(config=model.config)
    if getattr(inner, "rope_deltas", None) is not None:
        inner.rope_deltas = None  # computed afresh from this prompt's images
    with torch.inference_mode():
        if embeddings is None:
            # Per-token inputs (Qwen-VL's mm_token_type_ids, Gemma 3's token_type_ids) cover the prefix.
            extra = {
                k: v[:, :tokens] if k in PER_TOKEN_IMAGE_INPUTS else v
                for k, v in inputs.items()
                if k not in ("input_ids", "attention_mask")
            }
            prefill(model, ids[:, :tokens], cache, **extra)
        else:
            model(inputs_embeds=embeddings[:, :tokens], use_cache=True, **{cache_argument(model): cache})
    seconds = time.perf_counter() - start
    return SharedPrefix(cache, tokens, seconds, embeddings, generation_state(model))
