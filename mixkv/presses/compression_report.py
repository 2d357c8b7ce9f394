"""What a compression did, per run: kept tokens, bytes, image / video / text tokens, time.

A plain dataclass that a press holds as ``last_report``; it lives beside the presses so that they
need nothing from the integration layer, which fills it in (:mod:`mixkv.integration.prefill_report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CompressionReport:
    """Summary of one compressed prefill.

    Attributes
    ----------
    context_lengths : list[int]
        Real (non-padding) prompt tokens per sequence.
    budgets : list[int]
        Budget of each sequence (average kept tokens per KV head per layer, window included).
    kept_tokens : LongTensor ``(batch, layers, kv_heads)``
        Prompt entries kept per sequence, layer and KV head, window included. Layers that were not
        compressed show what they hold (the whole prompt, or a sliding window).
    compressed_layers : list[int]
        Decoder layers whose cache was compressed.
    skipped_layers : dict[int, str]
        Layers left alone, with the reason (e.g. sliding-window layers).
    full_bytes : int
        Bytes the cache would hold without compression (same layers, same dtype).
    compressed_bytes : int
        ``kv_cache_bytes(cache)`` right after prefill.
    compression_seconds : float
        Time spent scoring and compressing (inside prefill).
    image_tokens_total, video_tokens_total, text_tokens_total : list[int] or None
        Image-placeholder, video-placeholder and other (text) tokens in each prompt (None when the
        model has no visual placeholder token or the prompt came as embeddings). Tokens are told
        apart by the placeholder ids of the model's config; InternVL and SmolVLM expand video
        frames into image placeholders, so there their video frames count as image tokens.
    image_tokens_kept, video_tokens_kept, text_tokens_kept : list[float] or None
        Kept image / video / text entries per sequence, averaged over compressed layers and KV
        heads.
    position_keep_fraction : torch.Tensor or None
        ``(batch, prompt positions)``: for each prompt position, the fraction of (compressed layer,
        KV head) pairs whose cache kept it (1 for the observation window; padding is 0 unless
        nothing was compressed). What a heat map of the kept image tokens shows. Set for one-go
        prefills of models with a visual placeholder token (the same cases as the image counts);
        not part of :meth:`to_dict`.
    visual_tokens_total, visual_tokens_kept
        Properties: image + video, per sequence.
    """

    context_lengths: list[int]
    budgets: list[int]
    kept_tokens: torch.Tensor
    compressed_layers: list[int] = field(default_factory=list)
    skipped_layers: dict[int, str] = field(default_factory=dict)
    full_bytes: int = 0
    compressed_bytes: int = 0
    compression_seconds: float = 0.0
    image_tokens_total: list[int] | None = None
    text_tokens_total: list[int] | None = None
    image_tokens_kept: list[float] | None = None
    text_tokens_kept: list[float] | None = None
    video_tokens_total: list[int] | None = None
    video_tokens_kept: list[float] | None = None
    position_keep_fraction: torch.Tensor | None = None

    @property
    def visual_tokens_total(self) -> list[int] | None:
        """Image + video placeholder tokens per prompt."""
        return _add(self.image_tokens_total, self.video_tokens_total)

    @property
    def visual_tokens_kept(self) -> list[float] | None:
        """Kept image + video entries per sequence (mean over compressed layers and KV heads)."""
        return _add(self.image_tokens_kept, self.video_tokens_kept)

    @property
    def memory_fraction(self) -> float:
        """``compressed_bytes / full_bytes``."""
        return self.compressed_bytes / self.full_bytes if self.full_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "context_lengths": self.context_lengths,
            "budgets": self.budgets,
            "kept_tokens": self.kept_tokens.tolist(),
            "compressed_layers": self.compressed_layers,
            "skipped_layers": {str(k): v for k, v in self.skipped_layers.items()},
            "full_bytes": self.full_bytes,
            "compressed_bytes": self.compressed_bytes,
            "memory_fraction": self.memory_fraction,
            "compression_seconds": self.compression_seconds,
            "image_tokens_total": self.image_tokens_total,
            "text_tokens_total": self.text_tokens_total,
            "image_tokens_kept": self.image_tokens_kept,
            "text_tokens_kept": self.text_tokens_kept,
            "video_tokens_total": self.video_tokens_total,
            "video_tokens_kept": self.video_tokens_kept,
            "visual_tokens_total": self.visual_tokens_total,
            "visual_tokens_kept": self.visual_tokens_kept,
        }

    def summary(self) -> str:
        """One human-readable line: kept tokens, memory, time, and the visual tokens kept."""
        mean_kept = self.kept_tokens.float().mean().item() if self.kept_tokens.numel() else 0.0
        text = (
            f"context {self.context_lengths} -> {mean_kept:.1f} kept tokens per KV head on average; "
            f"KV cache {self.compressed_bytes / 2**20:.2f} MiB of {self.full_bytes / 2**20:.2f} MiB "
            f"({100 * self.memory_fraction:.1f}%); compression {1000 * self.compression_seconds:.1f} ms"
        )
        # Only the kinds a prompt holds: an image prompt reads "image tokens kept", a video prompt
        # "video tokens kept", a prompt with both adds their sum as "visual tokens kept".
        has_image = bool(self.image_tokens_total and any(self.image_tokens_total))
        has_video = bool(self.video_tokens_total and any(self.video_tokens_total))
        kinds = [
            ("image", self.image_tokens_kept, self.image_tokens_total, has_image or not has_video),
            ("video", self.video_tokens_kept, self.video_tokens_total, has_video),
            ("visual", self.visual_tokens_kept, self.visual_tokens_total, has_image and has_video),
        ]
        for kind, kept_counts, totals, shown in kinds:
            if shown and kept_counts is not None and totals is not None:
                pairs = ", ".join(
                    f"{kept:.1f}/{total}" for kept, total in zip(kept_counts, totals, strict=True)
                )
                text += f"; {kind} tokens kept {pairs}"
        return text


def _add(first: list[Any] | None, second: list[Any] | None) -> list[Any] | None:
    """Element-wise sum of two per-sequence lists; the other list when one is None."""
    if first is None or second is None:
        return first if second is None else second
    return [a + b for a, b in zip(first, second, strict=True)]
