"""The press protocol: what every press decides (scores, head budgets) and how it is applied."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from mixkv.functional import window_importance
from mixkv.presses.head_shard import HeadShard

if TYPE_CHECKING:
    from mixkv.integration.session import PressSession
    from mixkv.presses.compression_report import CompressionReport


@dataclass(frozen=True)
class LayerInputs:
    """What a layer's attention module was called with in the forward being compressed.

    Given only to presses that score from the module itself (``needs_layer_inputs``), as kvpress's
    scorer presses do (:class:`~mixkv.presses.kvpress_scorers.KvpressScorerPress`).

    Attributes
    ----------
    model : torch.nn.Module
        The whole model the press is attached to.
    module : torch.nn.Module
        The layer's attention module (its projections, config and ``layer_idx``).
    hidden_states : Tensor ``(B, Q, hidden)``
        The module's input in this forward (``Q`` = the forward's tokens).
    attentions : Tensor ``(B, H, Q, N)`` or None
        The attention weights the model's attention returned (eager attention only; None for sdpa).
    forward_kwargs : dict
        The keyword arguments of the module's forward (``position_embeddings``, the cache,
        ``hidden_states``...), as a forward hook with keyword inputs receives them.
    rotary_emb : torch.nn.Module or None
        The text decoder's rotary embedding module.
    """

    model: Any
    module: Any
    hidden_states: torch.Tensor
    attentions: torch.Tensor | None
    forward_kwargs: dict[str, Any]
    rotary_emb: Any = None


@dataclass
class ScoringContext:
    """Everything a press sees about one layer when it compresses it.

    At the end of a one-go prefill the cache holds the whole prompt. When the prompt arrives in
    chunks, or while decoding under :class:`~mixkv.DecodingPress`, it holds what earlier
    compressions kept followed by the newest tokens; the last ``W`` entries are always the newest
    ``W`` tokens.

    Attributes
    ----------
    queries : Tensor ``(B, H, W, D)``
        The model's own post-rotary queries of the last ``W`` (observation window) positions.
    keys, values : Tensor ``(B, Hkv, N, D)``
        The layer's cache (post-rotary keys), left-padded batches included.
    key_mask : BoolTensor ``(B, N)`` or ``(B, Hkv, N)``
        True for real entries, False for padding; per KV head when heads hold different numbers of
        entries (a head-wise compressed cache compressed again, each head padded on the left).
    scaling : float
        The attention module's logit scale.
    layer_idx : int
        Index of the layer in the decoder.
    compressible_layers : tuple[int, ...]
        The decoder's full-attention layers, the ones presses compress; layer-wise budget policies
        (PyramidKV, SparseMM) share the budget over these.
    budgets : LongTensor ``(B,)``
        Each sequence's budget (average kept tokens per KV head per layer, window included).
    kernel_size, pooling
        Pooling of the window attention (see :func:`mixkv.functional.pool_scores`).
    context_lengths : LongTensor ``(B,)``, optional
        Real tokens each sequence has seen (the prompt so far); defaults to the real entries of
        a ``(B, N)`` ``key_mask``.
    query_rotary : tuple of Tensor ``(B, W, r)``, optional
        The cos and sin tables the model rotated the window's queries with (its rotary position
        embedding), where the integration knows them.
    rope_inv_freq : Tensor ``(r / 2,)``, optional
        The inverse frequencies of the layer's rotary embedding, where the integration knows them.
    visual_mask : BoolTensor ``(B, N)``, optional
        True at the entries holding image or video placeholder tokens. Given when the layer holds
        the whole prompt, position for position (a one-go prefill, a declared prompt, a recorded
        prompt) of a model with visual placeholders; None otherwise (text-only models, chunked
        prompts, re-compressions while decoding).
    head_shard : HeadShard, optional
        Under tensor parallelism, which of the layer's KV heads this rank holds (``keys`` and
        ``values`` hold only those); None when the process holds every head.
    layer_inputs : LayerInputs, optional
        The attention module's inputs in this forward, for presses with ``needs_layer_inputs``.
    reconstruction_layers : dict[int, Tensor], optional
        KVzip's score of every entry (the most attention it received from the reconstruction
        forwards) for every compressible layer (layer index -> ``(B, Hkv, N)``), for presses with
        ``needs_reconstruction``; None otherwise. This layer's is :attr:`reconstruction_scores`.
    importance_source : str, default "window"
        What :attr:`importance` holds: the SnapKV importance (``"window"``), or another score a
        press put there in its place (``"kvpress-<scorer>"``).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    key_mask: torch.Tensor
    scaling: float
    layer_idx: int
    compressible_layers: tuple[int, ...]
    budgets: torch.Tensor
    kernel_size: int = 5
    pooling: Literal["avg", "max"] = "avg"
    context_lengths: torch.Tensor | None = None
    query_rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    rope_inv_freq: torch.Tensor | None = None
    visual_mask: torch.Tensor | None = None
    head_shard: HeadShard | None = None
    layer_inputs: LayerInputs | None = field(default=None, repr=False)
    reconstruction_layers: dict[int, torch.Tensor] | None = field(default=None, repr=False)
    importance_source: str = "window"
    _importance: torch.Tensor | None = field(default=None, repr=False)
    #: What a press derives once per layer and needs in both ``head_budgets`` and ``scores``.
    memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def window_size(self) -> int:
        return self.queries.shape[2]

    @property
    def layer_rank(self) -> int:
        """Position of this layer among the compressible layers."""
        return self.compressible_layers.index(self.layer_idx)

    @property
    def lengths(self) -> torch.Tensor:
        """Real tokens seen per sequence ``(B,)``."""
        if self.context_lengths is not None:
            return self.context_lengths
        return self.key_mask.sum(-1)

    @property
    def head_mask(self) -> torch.Tensor:
        """``key_mask`` per KV head, ``(B, Hkv, N)``."""
        if self.key_mask.dim() == 3:
            return self.key_mask
        return self.key_mask[:, None, :].expand(-1, self.keys.shape[1], -1)

    @property
    def reconstruction_scores(self) -> torch.Tensor | None:
        """KVzip's score ``(B, Hkv, N)`` of this layer's entries (None without a reconstruction)."""
        return None if self.reconstruction_layers is None else self.reconstruction_layers.get(self.layer_idx)

    @property
    def layer_kv_heads(self) -> int:
        """KV heads of the whole layer, over every tensor-parallel rank."""
        return self.keys.shape[1] if self.head_shard is None else self.head_shard.num_kv_heads

    def layer_heads(self, per_head: torch.Tensor) -> torch.Tensor:
        """A ``(B, Hkv, P)`` tensor over this rank's KV heads, gathered over every KV head of the
        layer from all tensor-parallel ranks (positions a rank lacks are ``-inf``)."""
        if self.head_shard is None:
            return per_head
        return self.head_shard.gather_heads(per_head, fill=float("-inf"))

    def layer_importance(self) -> torch.Tensor:
        """:attr:`importance` of every KV head of the layer ``(B, Hkv, P)`` (:meth:`layer_heads`)."""
        return self.layer_heads(self.importance)

    def own_heads(self, per_layer_head: torch.Tensor) -> torch.Tensor:
        """This rank's share of a tensor whose last axis runs over the whole layer's KV heads."""
        if self.head_shard is None:
            return per_layer_head
        return per_layer_head[..., self.head_shard.heads]

    @property
    def importance(self) -> torch.Tensor:
        """SnapKV importance ``I`` ``(B, Hkv, N - W)`` (pooled window attention), computed once."""
        if self._importance is None:
            self._importance = window_importance(
                self.queries,
                self.keys,
                kernel_size=self.kernel_size,
                pooling=self.pooling,
                scaling=self.scaling,
                key_mask=self.key_mask,
            )
        return self._importance


@dataclass
class BasePress:
    """Base of all presses: a budget, an observation window, a score and a budget policy.

    Parameters
    ----------
    budget : int, optional
        Average number of cached prompt tokens per KV head per layer, observation window included
        (the MixKV paper's budget: 64, 128, 256...). A prompt no longer than the budget is not
        compressed. Give either ``budget`` or ``compression_ratio``.
    compression_ratio : float, optional
        Fraction of the prompt to remove, in ``[0, 1)`` (kvpress's convention): the budget of a
        sequence of ``n`` tokens is ``round(n * (1 - compression_ratio))``, at least
        ``window_size + 1``.
    window_size : int, default 32
        Observation window ``W``: the last ``W`` prompt tokens, whose queries score the prompt and
        which are always kept.
    kernel_size : int, default 5
        Pooling kernel applied to the window attention.
    pooling : {"avg", "max"}, default "avg"
        Pooling of the window attention (SnapKV uses average pooling; some AdaKV scripts use max).

    After a forward pass that compressed the cache, ``last_report`` holds a
    :class:`~mixkv.CompressionReport`.
    """

    #: Whether the press scores from the attention module's inputs (:class:`LayerInputs`): such a
    #: press needs the whole prompt in the forward it compresses (no prefix, chunks or recordings).
    needs_layer_inputs: ClassVar[bool] = False
    #: Whether the press scores from reconstruction forwards the session runs after the prefill
    #: (:class:`~mixkv.presses.kvzip.KVzipPress`).
    needs_reconstruction: ClassVar[bool] = False

    budget: int | None = None
    compression_ratio: float | None = None
    window_size: int = 32
    kernel_size: int = 5
    pooling: Literal["avg", "max"] = "avg"
    last_report: CompressionReport | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.compression_ratio is None):
            raise ValueError(
                f"{type(self).__name__}: give exactly one of budget= (tokens per KV head, e.g. 128) "
                "or compression_ratio= (fraction removed, e.g. 0.75)"
            )
        if (
            isinstance(self.window_size, bool)
            or not isinstance(self.window_size, int)
            or self.window_size < 1
        ):
            raise ValueError(f"window_size must be an integer >= 1, got {self.window_size!r}")
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int):
                raise TypeError(
                    f"budget must be an int (tokens per KV head), got {type(self.budget).__name__}"
                )
            if self.budget <= 0:
                raise ValueError(f"budget must be a positive number of tokens, got {self.budget}")
            if self.budget <= self.window_size:
                raise ValueError(
                    f"budget ({self.budget}) must be larger than window_size ({self.window_size}): the window "
                    "is always kept, so raise the budget or lower window_size"
                )
        if self.compression_ratio is not None and not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {self.kernel_size!r}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")

    def __call__(self, model: torch.nn.Module) -> PressSession:
        """Attach the press to ``model`` for the duration of a ``with`` block."""
        from mixkv.integration.session import PressSession

        return PressSession(self, model)

    def sequence_budget(self, context_length: int) -> int:
        """Budget (window included) of a sequence with ``context_length`` real tokens."""
        if self.budget is not None:
            return self.budget
        ratio = self.compression_ratio or 0.0  # exactly one of the two is set (__post_init__)
        return max(self.window_size + 1, round(context_length * (1.0 - ratio)))

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        """Refuse per-head tables measured on a model of another shape (overridden where needed).

        ``num_layers`` counts every decoder layer (tables have one row per layer)."""

    def head_budgets(self, ctx: ScoringContext) -> torch.Tensor:
        """Kept tokens per sequence and KV head, window included, ``(B, Hkv)`` (default: uniform)."""
        batch, kv_heads = ctx.keys.shape[:2]
        return ctx.budgets.to(ctx.keys.device).unsqueeze(-1).expand(batch, kv_heads).clone()

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        """Selection score of every prefix position ``(B, Hkv, N - W)``; higher is kept."""
        raise NotImplementedError

    def merge_evicted(
        self, ctx: ScoringContext, indices: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values ``(B, Hkv, N, D)`` to take the kept entries from, once the evicted ones are
        merged into them; None (the default) keeps the entries as they are.

        ``indices`` / ``valid`` ``(B, Hkv, K)`` are the kept prefix positions and their validity
        (:func:`~mixkv.functional.select_top_per_head`); the window is kept too."""
        return None
