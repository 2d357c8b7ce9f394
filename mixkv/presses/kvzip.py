"""KVzip: scores from the attention the context receives while the model repeats it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from mixkv.functional import leading_real_positions, mixkv_mix, pooled_head_budgets, sinks_on_top
from mixkv.presses.base import BasePress, ScoringContext
from mixkv.presses.budget_policies import adaptive_layer_budgets


def _id_tuple(name: str, ids: Sequence[int] | torch.Tensor | None) -> tuple[int, ...] | None:
    if ids is None:
        return None
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    if isinstance(ids, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{name} must be a sequence of token ids (ints), got {ids!r}")
    return tuple(ids)


@dataclass(frozen=True)
class RepeatChunk:
    """One reconstruction forward: the repeat prompt ``ids`` ``(1, T)`` reconstructing the context
    entries ``[start, end)``. ``copies`` says where the repeat holds context tokens again: for each
    ``(row, first, last)``, the repeat's positions from ``row`` on are the context's ``[first,
    last)`` (an image prompt's repeat takes their input embeddings from the prompt there)."""

    start: int
    end: int
    ids: torch.Tensor
    copies: tuple[tuple[int, int, int], ...] = ()


@dataclass
class KVzipPress(BasePress):
    """KVzip: keep the entries the model attends to most while it repeats the context.

    After the prompt's prefill the model reads a repeat prompt - an instruction to repeat the
    context, the answer turn, then the context's tokens again - attending to the prompt's cache,
    in chunks of ``chunk_size`` context tokens. Each cached entry scores the most attention any
    query of the repeat pays it, over the query heads of its KV group
    (:func:`mixkv.functional.reconstruction_attention`; the softmax of a later chunk covers the
    first ``n_sink`` entries, the chunk and the repeat itself, as in KVzip's chunked scoring). The
    repeat's tokens never stay in the cache, and the prompt's logits are those of the plain
    prefill. The first ``n_sink`` entries and the observation window are always kept.

    Budgets: ``allocation="uniform"`` (default) keeps ``budget`` entries in every KV head of every
    layer, like the other mixkv presses; ``"adakv"`` shares each layer's slots between its KV heads
    by the KVzip score (:func:`mixkv.functional.adaptive_head_budgets`, ``floor_ratio``; with
    ``floor_ratio=0`` it is kvpress's ``layerwise=True``), stored packed; ``"global"`` pools the
    scores of every compressible layer and KV head and keeps the best ``L * Hkv * (budget - W)``
    prefix entries over all of them (:func:`mixkv.functional.pooled_head_budgets`), kvpress 0.5.5's
    default layout, so layers and heads keep different numbers (packed). The mean over layers and
    heads is ``budget`` in every layout.

    The repeat prompt is given as token ids, since the press does not see the tokenizer:
    ``repeat_prompt_ids`` precede the first chunk, ``continue_prompt_ids`` (default: the same)
    precede each later chunk, followed by the last ``overlap`` ids of the chunk before, and
    ``answer_prefix_ids`` (the chat template's switch to the assistant turn, may be empty) come
    right before the chunk's tokens. :func:`kvzip_prompt_ids` (also ``mixkv.integration.kvzip_prompt_ids``) builds kvpress's
    prompts from a tokenizer: ``KVzipPress(budget=128, **kvzip_prompt_ids(tokenizer))``.

    Costs a second forward over the whole prompt (and a bit more) after the prefill; one sequence at
    a time, text prompts in one forward, or continuing a prefix already in the cache once the whole
    prompt's ids are declared (``session.declare_prompt``); no chunked prefill, ``DecodingPress``,
    recordings or continuous batching (refused by name). Presses given the same
    ``reconstruction_memo`` reconstruct a prompt once (the scores do not depend on the budget).

    Paper: Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
    2025, https://arxiv.org/abs/2505.23416. Defaults (kvpress 0.5.5): ``chunk_size=2048``,
    ``n_sink=4``, ``overlap=8``; ``window_size=1`` (kvpress keeps no window; mixkv always keeps
    the last prompt token at least), ``allocation="uniform"`` (kvpress: ``"global"``),
    ``floor_ratio=0.2``.
    """

    #: Whether the session must run the reconstruction forwards before compressing.
    needs_reconstruction: ClassVar[bool] = True

    window_size: int = 1
    repeat_prompt_ids: Sequence[int] | None = field(default=None, repr=False)
    continue_prompt_ids: Sequence[int] | None = field(default=None, repr=False)
    answer_prefix_ids: Sequence[int] = field(default=(), repr=False)
    chunk_size: int = 2048
    overlap: int = 8
    n_sink: int = 4
    allocation: Literal["uniform", "adakv", "global"] = "uniform"
    floor_ratio: float = 0.2
    #: Prompts already reconstructed -> their scores and seconds, shared by presses that give it the
    #: same dict (e.g. one prompt compressed to several budgets): a prompt found here is not
    #: reconstructed again (see :meth:`reconstruction_key`).
    reconstruction_memo: dict[tuple[Any, ...], tuple[dict[int, torch.Tensor], float]] | None = field(
        default=None, repr=False, compare=False
    )
    #: Seconds the reconstruction forwards of the last prompt took (when its scores came from
    #: ``reconstruction_memo``: what they took when they ran).
    last_reconstruction_seconds: float | None = field(default=None, init=False, repr=False, compare=False)
    #: Whether the last prompt's scores came from ``reconstruction_memo``.
    last_reconstruction_reused: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.repeat_prompt_ids = _id_tuple("repeat_prompt_ids", self.repeat_prompt_ids)
        self.continue_prompt_ids = _id_tuple("continue_prompt_ids", self.continue_prompt_ids)
        self.answer_prefix_ids = _id_tuple("answer_prefix_ids", self.answer_prefix_ids) or ()
        for name in ("chunk_size", "overlap", "n_sink"):
            value = getattr(self, name)
            low = 1 if name == "chunk_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.allocation not in ("uniform", "adakv", "global"):
            raise ValueError(f"allocation must be 'uniform', 'adakv' or 'global', got {self.allocation!r}")
        if not 0.0 <= self.floor_ratio <= 1.0:
            raise ValueError(f"floor_ratio must be in [0, 1], got {self.floor_ratio}")

    def check_prompt_ids(self) -> tuple[int, ...]:
        """The repeat prompt's ids; refuse a press built without them."""
        if not self.repeat_prompt_ids:
            raise ValueError(
                f"{type(self).__name__} needs repeat_prompt_ids, the token ids of the instruction to repeat the "
                f"context: build the press as {type(self).__name__}(budget=..., "
                "**mixkv.integration.kvzip_prompt_ids(tokenizer))"
            )
        return tuple(self.repeat_prompt_ids)

    def reconstruction_key(
        self, context_ids: torch.Tensor, context_embeddings: torch.Tensor | None = None
    ) -> tuple[Any, ...]:
        """What the reconstruction scores of a context ``(1, N)`` depend on: its ids (and, for an
        image prompt, a digest of its input embeddings: the same ids hold different images), the
        repeat prompts and the chunking (not the budget, window or allocation)."""
        images = None
        if context_embeddings is not None:
            flat = context_embeddings.detach().float().cpu().contiguous()
            images = hashlib.sha1(flat.numpy().tobytes()).hexdigest()
        return (
            tuple(context_ids.reshape(-1).tolist()),
            images,
            tuple(self.repeat_prompt_ids or ()),
            tuple(self.continue_prompt_ids or ()),
            tuple(self.answer_prefix_ids),
            self.chunk_size,
            self.overlap,
            self.n_sink,
        )

    def repeat_chunks(self, context_ids: torch.Tensor) -> list[RepeatChunk]:
        """The reconstruction forwards of a context ``(1, N)``: chunks of ``chunk_size`` tokens, each
        after its instruction (and the previous chunk's last ``overlap`` ids) and the answer prefix."""
        first = self.check_prompt_ids()
        later = tuple(self.continue_prompt_ids or first)
        answer = tuple(self.answer_prefix_ids)
        ids = context_ids.reshape(-1).tolist()
        chunks = []
        for start in range(0, len(ids), self.chunk_size):
            end = min(start + self.chunk_size, len(ids))
            copies = []
            if start == 0:
                prompt = list(first)
            else:
                overlap_start = max(0, start - self.overlap) if self.overlap else start
                prompt = [*later, *ids[overlap_start:start]]
                if overlap_start < start:
                    copies.append((len(later), overlap_start, start))
            copies.append((len(prompt) + len(answer), start, end))
            row = torch.tensor(
                [[*prompt, *answer, *ids[start:end]]], dtype=torch.long, device=context_ids.device
            )
            chunks.append(RepeatChunk(start, end, row, tuple(copies)))
        return chunks

    def _reconstruction_scores(
        self, ctx: ScoringContext, layer_scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """KVzip score of every prefix entry ``(B, Hkv, N - W)`` of the layer (or of ``layer_scores``
        ``(B, Hkv, N)``, another layer's), sinks not raised."""
        if layer_scores is None:
            layer_scores = ctx.reconstruction_scores
        if layer_scores is None:
            raise ValueError(
                f"{type(self).__name__} scores from its reconstruction forwards, which this compression path "
                "does not run (chunked prefill, DecodingPress, recorded prompts, continuous batching); "
                "use another press"
            )
        return layer_scores[..., : ctx.keys.shape[2] - ctx.window_size].float()

    def _kvzip_scores(self, ctx: ScoringContext, layer_scores: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`_reconstruction_scores`, the sinks above every other (scores are at most 1)."""
        scores = self._reconstruction_scores(ctx, layer_scores)
        prefix_mask = ctx.head_mask[..., : scores.shape[-1]]
        sink = leading_real_positions(prefix_mask, self.n_sink)
        top = scores.masked_fill(~prefix_mask, float("-inf")).amax(-1, keepdim=True)
        return torch.where(sink, top.nan_to_num(0.0, neginf=0.0) + 1, scores)

    def head_budgets(self, ctx: ScoringContext) -> torch.Tensor:
        if self.allocation == "uniform":
            return super().head_budgets(ctx)
        if self.allocation == "global":
            return self._global_budgets(ctx)
        return adaptive_layer_budgets(
            ctx, ctx.layer_heads(self._kvzip_scores(ctx)), floor_ratio=self.floor_ratio, mass_scaling=False
        )

    def _global_budgets(self, ctx: ScoringContext) -> torch.Tensor:
        """Budgets of this layer's KV heads when every compressible layer's entries compete."""
        layers = ctx.reconstruction_layers
        if ctx.head_shard is not None:
            raise ValueError(
                "KVzipPress(allocation='global') is not supported under tensor parallelism; use 'uniform' or 'adakv'"
            )
        if layers is None or any(layer not in layers for layer in ctx.compressible_layers):
            raise ValueError(
                "KVzipPress(allocation='global') needs the reconstruction scores of every compressible layer, "
                "which this compression path does not have"
            )
        prefix_mask = ctx.head_mask[..., : ctx.keys.shape[2] - ctx.window_size]
        pooled = torch.stack(
            [
                self._kvzip_scores(ctx, layers[layer]).masked_fill(~prefix_mask, float("-inf"))
                for layer in ctx.compressible_layers
            ],
            dim=1,
        )  # (B, L, Hkv, P)
        slots = len(ctx.compressible_layers) * ctx.keys.shape[1]
        rows = [
            pooled_head_budgets(pooled[b], slots * (int(ctx.budgets[b]) - ctx.window_size))[ctx.layer_rank]
            for b in range(pooled.shape[0])
        ]
        return torch.stack(rows).to(ctx.keys.device) + ctx.window_size

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        return self._kvzip_scores(ctx)


@dataclass
class MixKVKVzipPress(KVzipPress):
    """MixKV on KVzip: the MixKV mix with KVzip's reconstruction score as the importance.

    ``s_h(j) = r_h div_h(j) + (1 - r_h) (KVzip_h(j) + n'_h(j))``, with the value-norm term ``n'``
    and the diversity ``div`` rescaled to the mean of the KVzip score over the head's prefix
    (:func:`mixkv.functional.mixkv_mix`) and ``r_h`` the head's online redundancy; the ``n_sink``
    sinks stay always kept. The budgets are KVzip's (``allocation``): the mix only chooses which
    entries fill each head's budget, as MixKV does on any budget policy, so with
    ``allocation="global"`` the pooled KVzip scores set each head's budget and the mix its entries.
    Papers: MixKV (https://arxiv.org/abs/2510.20707) and KVzip (https://arxiv.org/abs/2505.23416).
    Defaults as :class:`KVzipPress`.
    """

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        prefix_mask = ctx.head_mask[..., : ctx.keys.shape[2] - ctx.window_size]
        importance = self._reconstruction_scores(ctx).masked_fill(~prefix_mask, float("-inf"))
        mixed = mixkv_mix(importance, ctx.keys, ctx.values, ctx.window_size, key_mask=ctx.key_mask)
        return sinks_on_top(mixed, prefix_mask, self.n_sink)


def kvzip_prompt_ids(tokenizer: Any) -> dict[str, tuple[int, ...]]:
    """KVzip's repeat prompts as token ids of ``tokenizer``, for :class:`KVzipPress`.

    The prompts of kvpress 0.5.5's ``KVzipPress``: ``"\\n\\nRepeat the previous context exactly."``
    before the first chunk, ``"\\n\\nRepeat the part of the previous context exactly, starting
    with"`` before each later one, then the chat template's switch from the user turn to the
    assistant's answer (``"\\n"`` for a tokenizer without a chat template).

    Returns
    -------
    dict
        ``repeat_prompt_ids``, ``continue_prompt_ids`` and ``answer_prefix_ids``; use as
        ``KVzipPress(budget=128, **kvzip_prompt_ids(tokenizer))``.
    """

    def encode(text: str) -> tuple[int, ...]:
        return tuple(int(i) for i in tokenizer.encode(text, add_special_tokens=False))

    if getattr(tokenizer, "chat_template", None) is None:
        answer = "\n"
    else:
        dummy = "dummy context"
        separator = "\n" + "#" * len(dummy)
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": dummy + separator}],
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=False,
        )
        answer = rendered.split(separator)[1]
    return {
        "repeat_prompt_ids": encode("\n\nRepeat the previous context exactly."),
        "continue_prompt_ids": encode("\n\nRepeat the part of the previous context exactly, starting with"),
        "answer_prefix_ids": encode(answer),
    }
