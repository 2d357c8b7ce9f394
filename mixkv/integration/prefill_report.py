"""Bookkeeping of one prompt forward, turned into the press's :class:`~mixkv.CompressionReport`.

A record starts at the forward's first compressible layer, collects what each layer kept (and, when
the forward's ids cover the whole prompt, how many image and video tokens it kept) and becomes a
report after the last layer, measured on the cache as it then is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from mixkv.integration.cache import CompressedLayer, kv_cache_bytes, layer_bytes
from mixkv.integration.decoder_layout import DecoderLayout
from mixkv.presses.compression_report import CompressionReport
from mixkv.presses.head_shard import HeadShard


@dataclass
class PrefillRecord:
    """Bookkeeping of one prompt forward, turned into a CompressionReport at its last layer."""

    lengths: list[int]
    budgets: list[int]
    kept: torch.Tensor
    compressed_layers: list[int] = field(default_factory=list)
    skipped_layers: dict[int, str] = field(default_factory=dict)
    # Visual placeholders of the prompt, ``(B, N)`` each (None for text-only models, embeddings or
    # chunked prompts).
    is_image: torch.Tensor | None = None
    is_video: torch.Tensor | None = None
    # Kept image / video entries per sequence, summed over compressed layers (KV-head mean).
    image_kept: torch.Tensor | None = None
    video_kept: torch.Tensor | None = None
    # Per prompt position ``(B, N)``: the KV-head fraction keeping it, summed over compressed layers.
    position_kept: torch.Tensor | None = None

    @classmethod
    def start(
        cls,
        lengths: torch.Tensor,
        budgets: list[int],
        layout: DecoderLayout,
        ids: torch.Tensor | None,
        key_mask: torch.Tensor,
    ) -> PrefillRecord:
        """A record for a prompt of ``lengths`` ``(B,)`` real tokens so far.

        Visual tokens are counted when ``ids`` cover the whole prompt (a one-go prefill, or a
        declared prompt): when they have the shape of the held entries' ``key_mask`` ``(B, N)``.
        """
        batch = lengths.shape[0]
        record = cls(
            lengths=[int(n) for n in lengths.tolist()],
            budgets=budgets,
            kept=torch.zeros((batch, layout.num_layers, layout.num_kv_heads), dtype=torch.long),
        )
        masks = layout.visual_token_masks(ids) if ids is not None and ids.shape == key_mask.shape else None
        if ids is not None and masks is not None:
            real = key_mask.to(ids.device)
            record.is_image, record.is_video = (mask & real for mask in masks)
            record.image_kept = torch.zeros(batch)
            record.video_kept = torch.zeros(batch)
            record.position_kept = torch.zeros(key_mask.shape[0], key_mask.shape[-1])
        return record

    def count_kept(
        self,
        key_mask: torch.Tensor,
        selection: tuple[torch.Tensor, torch.Tensor],
        window: int,
        head_shard: HeadShard | None = None,
    ) -> None:
        """Add the image, video and per-position entries one layer's compression kept.

        ``selection`` is the kept prefix positions and their validity ``(B, Hkv, K)``; the last
        ``window`` entries are always kept. Counted only for one-go prefills (the forward's ids
        cover the whole cache). Under tensor parallelism (``head_shard``) the means run over the
        KV heads of every rank.
        """
        if self.image_kept is None or self.video_kept is None:
            return
        indices, valid = selection
        prefix = key_mask.shape[-1] - window
        window_valid = key_mask[:, prefix:]
        batch, heads = indices.shape[0], indices.shape[1]
        image = _kept_of(self.is_image, indices, valid, prefix, window_valid)
        video = _kept_of(self.is_video, indices, valid, prefix, window_valid)
        in_prefix = torch.zeros(batch, prefix)
        in_prefix.scatter_add_(1, indices.reshape(batch, -1).cpu(), valid.reshape(batch, -1).float().cpu())
        in_prefix /= heads
        if head_shard is not None:  # equal shares of heads: the mean over all is the mean of means
            image, video, in_prefix = (
                head_shard.sum(part) / head_shard.size for part in (image, video, in_prefix)
            )
        self.image_kept += image
        self.video_kept += video
        if self.position_kept is not None:
            self.position_kept[:, :prefix] += in_prefix
            self.position_kept[:, prefix:] += window_valid.float().cpu()

    def report(
        self, cache: Cache, layout: DecoderLayout, seconds: float, head_shard: HeadShard | None = None
    ) -> CompressionReport:
        """The report of the forward, measured on ``cache`` after its last layer.

        ``seconds`` is the time spent compressing the prompt so far. Under tensor parallelism
        (``head_shard``) the report describes the whole model: kept tokens of every rank's heads,
        bytes summed over the ranks.
        """
        lengths = torch.tensor(self.lengths)
        full_bytes = 0
        compressed_layers = []
        for layer_idx, layer in enumerate(cache.layers):
            if isinstance(layer, CompressedLayer):
                compressed_layers.append(layer_idx)
                counts = layer.held_counts()
                if head_shard is not None:
                    counts = head_shard.gather_heads(counts)
                self.kept[:, layer_idx] = counts.cpu()
                keys, _ = layer.dense()
                # What a DynamicLayer would hold for every token seen: keys and values.
                full_bytes += (
                    2
                    * keys.shape[0]
                    * keys.shape[1]
                    * layer.seen_tokens
                    * keys.shape[3]
                    * keys.element_size()
                )
            else:
                full_bytes += layer_bytes(layer)
            if layer_idx not in layout.compressible_layers:
                held = getattr(layer, "keys", None)
                window = held.shape[-2] if isinstance(held, torch.Tensor) else 0
                self.kept[:, layer_idx] = lengths.clamp(max=window).unsqueeze(-1)
                self.skipped_layers[layer_idx] = (
                    "sliding-window layer (its cache is already bounded by the window)"
                )
        compressed_bytes = kv_cache_bytes(cache)
        if head_shard is not None:
            full_bytes, compressed_bytes = head_shard.sum(
                torch.tensor([full_bytes, compressed_bytes])
            ).tolist()
        return CompressionReport(
            context_lengths=self.lengths,
            budgets=self.budgets,
            kept_tokens=self.kept,
            compressed_layers=compressed_layers,
            skipped_layers=self.skipped_layers,
            full_bytes=full_bytes,
            compressed_bytes=compressed_bytes,
            compression_seconds=seconds,
            **self._token_counts(lengths),
        )

    def _token_counts(self, lengths: torch.Tensor) -> dict[str, Any]:
        """The report's image / video / text totals and kept counts (empty without visual masks)."""
        if (
            self.is_image is None
            or self.is_video is None
            or self.image_kept is None
            or self.video_kept is None
        ):
            return {}
        counts: dict[str, Any] = {}
        image_total = self.is_image.sum(-1).cpu()
        video_total = self.is_video.sum(-1).cpu()
        if self.compressed_layers:  # means over compressed layers (and KV heads)
            layers = len(self.compressed_layers)
            image_kept, video_kept = self.image_kept / layers, self.video_kept / layers
            all_kept = self.kept[:, self.compressed_layers].float().mean((1, 2))
        else:  # nothing compressed: every token is kept
            image_kept, video_kept = image_total.float(), video_total.float()
            all_kept = lengths.float()
        if self.position_kept is not None:
            fraction = (
                self.position_kept / len(self.compressed_layers)
                if self.compressed_layers
                else torch.ones_like(self.position_kept)
            )
            counts["position_keep_fraction"] = fraction
        counts.update(
            {
                "image_tokens_total": image_total.tolist(),
                "video_tokens_total": video_total.tolist(),
                "text_tokens_total": (lengths - image_total - video_total).tolist(),
                "image_tokens_kept": image_kept.tolist(),
                "video_tokens_kept": video_kept.tolist(),
                "text_tokens_kept": (all_kept - image_kept - video_kept).tolist(),
            }
        )
        return counts


def _kept_of(
    is_kind: torch.Tensor | None,
    indices: torch.Tensor,
    valid: torch.Tensor,
    prefix: int,
    window_valid: torch.Tensor,
) -> torch.Tensor:
    """Kept entries of one kind (e.g. video tokens) per sequence, averaged over KV heads.

    ``indices``/``valid`` ``(B, H, K)`` are the kept prefix positions; the window is always kept.
    """
    if is_kind is None:
        return torch.zeros(indices.shape[0])
    is_kind = is_kind.to(indices.device)
    batch = indices.shape[0]
    in_prefix = is_kind[:, :prefix].gather(1, indices.reshape(batch, -1)).view_as(valid) & valid
    in_window = (is_kind[:, prefix:] & window_valid).sum(-1, keepdim=True)
    return (in_prefix.sum(-1) + in_window).float().mean(-1).cpu()
