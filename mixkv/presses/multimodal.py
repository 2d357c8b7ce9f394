"""Presses designed for vision-language models: VL-Cache and LOOK-M.

Both read which prompt positions hold visual placeholders from ``ScoringContext.visual_mask``
(given when the compressed layer holds the whole prompt; None for text-only prompts, chunked
prompts and re-compressions while decoding, where they fall back as documented).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mixkv.functional import pivot_merge, post_vision_attention, post_vision_rows, running_density_budget
from mixkv.presses.base import BasePress, ScoringContext

#: Added to the score of every text prefix token under LOOK-M's text prior. Window attention is a
#: probability (at most 1), so every text token then ranks above every visual one.
TEXT_PRIOR_BONUS = 2.0


@dataclass
class VLCachePress(BasePress):
    """VL-Cache: layer budgets from attention sparsity, token scores from post-vision attention.

    Post-vision queries ``R`` are the observation-window rows after the prompt's last image or video
    token (:func:`~mixkv.functional.post_vision_rows`). In each layer:

    * sparsity ``gamma_l``: the fraction of the entries a post-vision query sees whose attention is
      below ``sparsity_threshold`` times its row's maximum, averaged over query heads and rows;
    * budget: layer ``l`` gets a share of the model's prefix budget ``L (budget - W)`` proportional
      to its density ``1 - gamma_l`` (:func:`~mixkv.functional.running_density_budget`), plus the
      window;
    * score: ``s_h(j) = (1/g) sum_{h' in h} sum_{i in R} A_{h'}[i, j]``, the attention each prefix
      position receives from the post-vision queries (no pooling), and each KV head keeps its best.

    Paper: Tu et al., "VL-Cache: Sparsity and Modality-Aware KV Cache Compression for
    Vision-Language Model Inference Acceleration", ICLR 2025, https://arxiv.org/abs/2410.23317.
    No public code; choices the paper leaves open, made here:

    * the post-vision queries are capped at the observation window: the session keeps the last
      ``window_size`` queries, so a question longer than the window is scored by its last
      ``window_size`` tokens (raise ``window_size`` to cover it); when no window row follows the
      last visual token, or the prompt has no visual token (text-only prompts, chunked prompts,
      re-compressions while decoding), every window row is a post-vision query;
    * budgets are allocated as layers are compressed, in order: a layer's density is known before
      the later layers' are, so unseen layers are taken at the mean density so far and the last
      layer takes what remains (the total over layers stays exact); a layer compressed with no
      record of the earlier layers under the same budgets (a re-compression under
      :class:`~mixkv.DecodingPress`, a new batch) takes them as having spent evenly;
    * selection is per KV head (GQA groups averaged), like the other presses here;
    * ``kernel_size`` / ``pooling`` are not used (the paper accumulates raw attention).

    Default ``sparsity_threshold=0.01`` (1% of the row maximum, as in the paper).
    """

    sparsity_threshold: float = 0.01
    # Per layer rank, its latest compression: prefix budget per layer, density and prefix kept, each
    # ``(B,)``; the earlier layers' entries are those of the current pass (layers go in order).
    _allocations: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.sparsity_threshold < 1.0:
            raise ValueError(
                f"sparsity_threshold must be in (0, 1) (a fraction of each row's maximum, e.g. 0.01), "
                f"got {self.sparsity_threshold}"
            )

    def post_vision(self, ctx: ScoringContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-vision scores ``(B, Hkv, N - W)`` and layer sparsity ``(B,)`` of ``ctx``, computed once."""
        if "vlcache" not in ctx.memo:
            mask = ctx.key_mask if ctx.key_mask.dim() == 2 else ctx.key_mask[:, 0]
            rows = post_vision_rows(ctx.visual_mask, ctx.window_size, key_mask=mask)
            ctx.memo["vlcache"] = post_vision_attention(
                ctx.queries,
                ctx.keys,
                rows,
                threshold=self.sparsity_threshold,
                scaling=ctx.scaling,
                key_mask=ctx.key_mask,
            )
        result: tuple[torch.Tensor, torch.Tensor] = ctx.memo["vlcache"]
        return result

    def head_budgets(self, ctx: ScoringContext) -> torch.Tensor:
        _, sparsity = self.post_vision(ctx)
        density = (1.0 - sparsity).double().cpu()
        batch, kv_heads = ctx.keys.shape[:2]
        rank, num_layers = ctx.layer_rank, len(ctx.compressible_layers)
        per_layer = ctx.budgets.cpu().long() - ctx.window_size
        earlier = [self._allocations.get(r) for r in range(rank)]
        if all(entry is not None and torch.equal(entry[0], per_layer) for entry in earlier):
            # The earlier layers of this pass, under the same budgets: share what they left.
            seen = [entry for entry in earlier if entry is not None]
            density_sum = density + sum((entry[1] for entry in seen), torch.zeros_like(density))
            remaining = num_layers * per_layer - sum(
                (entry[2] for entry in seen), torch.zeros_like(per_layer)
            )
            layers_seen = rank + 1
        else:  # no record of the earlier layers under these budgets: take them as spent evenly
            density_sum, remaining, layers_seen = density, (num_layers - rank) * per_layer, 1
        prefix = ctx.keys.shape[2] - ctx.window_size
        available = ctx.head_mask[..., :prefix].sum(-1).min(-1).values.cpu()
        kept = running_density_budget(
            density, density_sum, layers_seen, num_layers - rank, remaining, available
        )
        self._allocations[rank] = (per_layer, density, kept)
        return (kept + ctx.window_size).to(ctx.keys.device).unsqueeze(-1).expand(batch, kv_heads).clone()

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        return self.post_vision(ctx)[0]


@dataclass
class LookMPress(BasePress):
    """LOOK-M: text-prior eviction, each evicted entry merged into its most similar kept entry.

    Score: the attention the observation window pays each prefix position (SnapKV's importance
    with ``kernel_size=1``: no pooling), plus ``TEXT_PRIOR_BONUS`` on text tokens when the prompt
    has visual tokens, so a head keeps its best text tokens first and fills the rest of its budget
    with the best visual ones (LOOK-M adds -65516 to image tokens). Then every evicted real entry
    is folded into the kept entry (window included) whose key is most cosine-similar, keys and
    values alike, by the pivotal merge (:func:`~mixkv.functional.pivot_merge`):
    ``x_t' = (x_t + sum_p (x_p + x_t) / 2) / (1 + |E_t|)``.

    What "kept" means: the reported kept positions are the positions whose (merged) entries the
    cache holds; at a kept position nothing was merged into, key and value are the original ones.

    Paper: Wan et al., "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal
    Long-Context Inference", Findings of EMNLP 2024, https://arxiv.org/abs/2406.18139; code
    https://github.com/SUSTechBruce/LOOK-M (``TextPivotMerge_LayerWise``, the variant its
    evaluation script runs, ``text_prior_pivot_merge``; it also has average and weighted merges).
    Differences from the code: the code scores with the attention of every prompt query (H2O) and
    keeps a recent window of 10% of the prompt; here the observation window's queries score (the
    session keeps only those) and the window is ``window_size`` tokens. Without visual tokens
    (text-only prompts) the text prior does nothing and LOOK-M is window attention with merging.

    Defaults: ``kernel_size=1``, ``text_prior=True``, ``merge=True`` (``merge=False`` keeps the
    text-prior eviction alone, for ablations).
    """

    kernel_size: int = 1
    text_prior: bool = True
    merge: bool = True

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        importance = ctx.importance
        if not self.text_prior or ctx.visual_mask is None:
            return importance
        prefix = importance.shape[-1]
        text = ~ctx.visual_mask[:, None, :prefix].to(importance.device)
        return importance + TEXT_PRIOR_BONUS * text.to(importance.dtype)

    def merge_evicted(
        self, ctx: ScoringContext, indices: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.merge:
            return None
        batch, kv_heads, length = ctx.keys.shape[:3]
        prefix = length - ctx.window_size
        window = torch.arange(prefix, length, device=indices.device).expand(batch, kv_heads, -1)
        window_valid = ctx.head_mask[..., prefix:]
        kept_index = torch.cat([indices, window], dim=-1)
        kept_valid = torch.cat([valid, window_valid], dim=-1)
        return pivot_merge(ctx.keys, ctx.values, kept_index, kept_valid, ctx.head_mask)
