"""Per-position KV-cache scores: window attention, value norms, key diversity and the MixKV mix.

Every function works on batched cache tensors and scores the *prefix* of a prompt, i.e. the
``N - W`` positions before the observation window of the last ``W`` positions (the window itself
is always kept). Higher scores mean "keep". Conventions shared by all functions:

* ``queries``: ``(B, H, W, D)`` post-rotary queries of the last ``W`` prompt positions.
* ``keys`` / ``values``: ``(B, Hkv, N, D)`` as they sit in the cache (keys after rotary).
* GQA: ``H`` is a multiple of ``Hkv``; query head ``i`` belongs to KV head ``i // (H // Hkv)``.
* ``key_mask``: optional ``(B, N)`` bool (or 0/1 integer) tensor, True for real tokens and False
  for padding; or ``(B, Hkv, N)`` when heads hold different entries (a head-wise compressed cache
  being compressed again, padded per head). Padded positions never influence a score and every returned per-position score is
  ``-inf`` there (window attention, an input to pooling, is ``0`` there instead).
* Scores are computed and returned in float32, or in float64 when an input is float64.

The maths follows ``docs/mixkv_spec.md`` (sections 1 to 3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mixkv.functional.checks import as_int

__all__ = [
    "expected_attention",
    "future_rotary",
    "head_redundancy",
    "key_diversity",
    "key_norm_scores",
    "last_query_attention",
    "leading_real_positions",
    "mix_scores",
    "mixkv_mix",
    "mixkv_scores",
    "pool_scores",
    "post_vision_attention",
    "post_vision_rows",
    "sinks_on_top",
    "unrotate_queries",
    "value_norm_importance",
    "window_attention",
    "window_importance",
]

RESCALE_EPS = 1e-8
"""Added to the mean in the rescaling ``x * target / (mean(x) + eps)`` (spec 1.5)."""

DIVERSITY_EPS = 1e-8
"""Added to the min-max range of the diversity term (spec 2.4)."""

NOISE_ULPS = 16
"""A min-max range within this many machine epsilons of the magnitude counts as zero (flat row)."""

POOLING_MODES = ("avg", "max")


def _score_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_floating(name: str, tensor: object, layout: str) -> Tensor:
    """Check that ``tensor`` is a floating tensor with as many dims as ``layout`` names."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {tensor.dtype}; cast it with .float()"
        )
    expected_ndim = layout.count(",") + 1
    if tensor.ndim != expected_ndim:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(tensor.shape)}")
    return tensor


def _check_cache(name: str, tensor: object) -> tuple[int, int, int, int]:
    """Validate a ``(B, Hkv, N, D)`` cache tensor and return its shape."""
    checked = _check_floating(name, tensor, "(batch, num_kv_heads, seq_len, head_dim)")
    batch, kv_heads, seq_len, head_dim = checked.shape
    return batch, kv_heads, seq_len, head_dim


def _check_values(values: object, batch: int, kv_heads: int, seq_len: int) -> None:
    """Validate ``values`` against the ``(B, Hkv, N)`` of the keys."""
    shape = _check_cache("values", values)
    if shape[:3] != (batch, kv_heads, seq_len):
        raise ValueError(
            f"values must have shape (batch, num_kv_heads, seq_len, head_dim) = ({batch}, {kv_heads}, "
            f"{seq_len}, ...) like the keys, got {shape}"
        )


def _check_window(name: str, window_size: int, seq_len: int) -> int:
    """Validate a window size ``1 <= W < N`` and return it as an int."""
    window = as_int(name, window_size)
    if window < 1:
        raise ValueError(f"{name} must be at least 1, got {window}")
    if window >= seq_len:
        raise ValueError(
            f"{name} ({window}) must be smaller than the sequence length ({seq_len}): there is no prefix "
            "to score; do not compress prompts that short"
        )
    return window


def _check_queries(queries: object, batch: int, kv_heads: int, seq_len: int, head_dim: int) -> int:
    """Validate ``(B, H, W, D)`` queries against the keys and return ``W``."""
    checked = _check_floating("queries", queries, "(batch, num_heads, window_size, head_dim)")
    q_batch, heads, window, q_dim = checked.shape
    if q_batch != batch:
        raise ValueError(f"queries have batch size {q_batch} but keys have {batch}; pass matching batches")
    if q_dim != head_dim:
        raise ValueError(f"queries have head_dim {q_dim} but keys have {head_dim}; they must be equal")
    if heads % kv_heads != 0:
        raise ValueError(
            f"the number of query heads ({heads}) must be a multiple of the number of KV heads ({kv_heads})"
        )
    return _check_window("window_size (queries.shape[2])", window, seq_len)


def _check_scaling(scaling: float | None, head_dim: int) -> float:
    """Return the logit scale, ``1 / sqrt(D)`` by default."""
    if scaling is None:
        return 1.0 / math.sqrt(head_dim)
    if not scaling > 0:
        raise ValueError(f"scaling must be positive (default 1/sqrt(head_dim)), got {scaling}")
    return float(scaling)


def _check_pooling(kernel_size: int, pooling: str) -> int:
    """Validate the pooling options and return the kernel size."""
    kernel = as_int("kernel_size", kernel_size)
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1 (e.g. 5), got {kernel}")
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
    return kernel


def _valid_mask(key_mask: Tensor | None, batch: int, seq_len: int, device: torch.device) -> Tensor:
    """Return the real-token mask as a ``(B, 1, N)`` (or, per head, ``(B, Hkv, N)``) bool tensor."""
    if key_mask is None:
        return torch.ones(batch, 1, seq_len, dtype=torch.bool, device=device)
    if not isinstance(key_mask, Tensor):
        raise TypeError(f"key_mask must be a torch.Tensor or None, got {type(key_mask).__name__}")
    if key_mask.is_floating_point() or key_mask.is_complex():
        raise TypeError(f"key_mask must be a bool (or 0/1 integer) tensor, got dtype {key_mask.dtype}")
    per_head = key_mask.dim() == 3 and key_mask.shape[0] == batch and key_mask.shape[2] == seq_len
    if tuple(key_mask.shape) != (batch, seq_len) and not per_head:
        raise ValueError(
            f"key_mask must have shape (batch, seq_len) = ({batch}, {seq_len}) or (batch, num_kv_heads, "
            f"seq_len), got {tuple(key_mask.shape)}"
        )
    mask = (key_mask != 0).to(device)
    return mask if per_head else mask[:, None, :]


def _check_target(target_mean: object, batch: int, kv_heads: int, dtype: torch.dtype) -> Tensor:
    """Validate a ``(B, Hkv)`` target mean and cast it to ``dtype``."""
    checked = _check_floating("target_mean", target_mean, "(batch, num_kv_heads)")
    if tuple(checked.shape) != (batch, kv_heads):
        raise ValueError(
            f"target_mean must have shape (batch, num_kv_heads) = ({batch}, {kv_heads}), "
            f"got {tuple(checked.shape)}"
        )
    return checked.to(dtype)


def _check_redundancy(redundancy: object, batch: int, kv_heads: int, dtype: torch.dtype) -> Tensor:
    """Validate a redundancy of shape ``(Hkv,)`` or ``(B, Hkv)`` in ``[0, 1]``; return ``(B, Hkv)``."""
    if not isinstance(redundancy, Tensor) or not redundancy.is_floating_point():
        raise TypeError(
            "redundancy must be a floating-point torch.Tensor of shape (num_kv_heads,) or "
            "(batch, num_kv_heads)"
        )
    if tuple(redundancy.shape) not in ((kv_heads,), (batch, kv_heads)):
        raise ValueError(
            f"redundancy must have shape (num_kv_heads,) = ({kv_heads},) or (batch, num_kv_heads) = "
            f"({batch}, {kv_heads}), got {tuple(redundancy.shape)}"
        )
    if not bool(((redundancy >= 0) & (redundancy <= 1)).all()):
        raise ValueError(
            "redundancy values must lie in [0, 1] (clip them or recompute the calibration table)"
        )
    return redundancy.to(dtype).expand(batch, kv_heads)


def _masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``x`` over the last dim where ``valid``; ``0`` for rows without a valid entry."""
    count = valid.sum(-1).clamp_min(1)
    return torch.where(valid, x, 0.0).sum(-1) / count


def _minmax(x: Tensor, valid: Tensor, eps: float) -> Tensor:
    """``(x - min) / (max - min + eps)`` over the valid entries; ``0`` at pads and for a flat row.

    A row is flat when ``max - min`` is at rounding-noise level, ``<= NOISE_ULPS * machine_eps *
    max(|min|, |max|)``: its entries are equal up to rounding and carry no ranking information.
    """
    low = torch.where(valid, x, math.inf).amin(-1, keepdim=True)
    high = torch.where(valid, x, -math.inf).amax(-1, keepdim=True)
    spread = high - low
    noise = NOISE_ULPS * torch.finfo(x.dtype).eps * torch.maximum(low.abs(), high.abs())
    spread_ok = spread > noise  # False for a flat row and for a row without valid entries
    shifted = torch.where(valid & spread_ok, x - low, 0.0)
    return shifted / torch.where(spread_ok, spread + eps, 1.0)


def _rescale(x: Tensor, valid: Tensor, target: Tensor) -> Tensor:
    """``x * target / (mean(x) + 1e-8)`` with the mean over the valid entries."""
    return x * (target / (_masked_mean(x, valid) + RESCALE_EPS))[..., None]


def _mask_pads(x: Tensor, valid: Tensor) -> Tensor:
    """Put ``-inf`` where ``valid`` is False."""
    return x.masked_fill(~valid, -math.inf)


def _window_probs(
    queries: Tensor, keys: Tensor, scale: float, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row window attention ``(B, Hkv, g, W, N)``, the keys each row sees ``(B, 1 or Hkv, W, N)``
    and the real window queries ``(B, 1 or Hkv, W)``; ``valid`` is ``(B, 1, N)`` or ``(B, Hkv, N)``."""
    dtype = _score_dtype(queries, keys)
    batch, heads, window, head_dim = queries.shape
    kv_heads, seq_len = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    grouped = queries.to(dtype).reshape(batch, kv_heads, group, window, head_dim)
    logits = torch.einsum("bkgwd,bknd->bkgwn", grouped, keys.to(dtype)) * scale
    positions = torch.arange(seq_len, device=keys.device)
    causal = positions[None, :] <= positions[seq_len - window :, None]  # (W, N)
    query_valid = valid[..., seq_len - window :]  # (B, 1 or Hkv, W)
    sees = causal & valid[..., None, :]
    # A padded window query is dropped from the mean below; letting it see every key keeps its row finite.
    visible = sees | ~query_valid[..., None]  # (B, 1 or Hkv, W, N)
    probs = logits.masked_fill(~visible[:, :, None], -math.inf).softmax(dim=-1)
    return probs, sees, query_valid


def _window_attention(queries: Tensor, keys: Tensor, scale: float, valid: Tensor) -> Tensor:
    """Validated core of :func:`window_attention`; ``valid`` is ``(B, 1, N)`` or ``(B, Hkv, N)``."""
    probs, _, query_valid = _window_probs(queries, keys, scale, valid)
    batch, kv_heads, group, window, seq_len = probs.shape
    weights = query_valid.to(probs.dtype) / query_valid.sum(-1, keepdim=True).clamp_min(1)
    attention = torch.einsum("bkgwn,bkw->bkn", probs, weights.expand(batch, kv_heads, window)) / group
    return attention[..., : seq_len - window]


def window_attention(
    queries: Tensor,
    keys: Tensor,
    *,
    scaling: float | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    r"""Attention paid to each prefix position by the observation window, averaged per KV head.

    .. math::

        A_{h'} = \operatorname{softmax}\big(s \, Q_{h'} K_{h}^\top + M\big), \qquad
        a_h(j) = \frac{1}{g} \sum_{h' \in h} \frac{1}{W} \sum_{i=1}^{W} A_{h'}[i, j]

    for prefix positions ``j < N - W``, where ``s`` is ``scaling``, ``M`` is ``-inf`` for window
    key ``j > i`` (causal inside the window) and for padded keys, and ``h' in h`` runs over the
    ``g = H / Hkv`` query heads of KV head ``h``. The softmax runs over all ``N`` keys.

    Parameters
    ----------
    queries : Tensor
        ``(B, H, W, D)`` post-rotary queries of the last ``W`` positions.
    keys : Tensor
        ``(B, Hkv, N, D)`` post-rotary keys.
    scaling : float, optional
        Logit scale ``s``; ``1 / sqrt(D)`` by default.
    key_mask : Tensor, optional
        ``(B, N)`` real-token mask. Padded keys get no attention; padded window queries (only
        possible for rows shorter than the window) are left out of the mean over ``W``.

    Returns
    -------
    Tensor
        ``(B, Hkv, N - W)`` attention probabilities, ``0`` at padded positions (a probability, not
        a score: it is pooled before padding is masked with ``-inf``).
    """
    batch, kv_heads, seq_len, head_dim = _check_cache("keys", keys)
    _check_queries(queries, batch, kv_heads, seq_len, head_dim)
    scale = _check_scaling(scaling, head_dim)
    valid = _valid_mask(key_mask, batch, seq_len, keys.device)
    return _window_attention(queries, keys, scale, valid)


def pool_scores(scores: Tensor, kernel_size: int = 5, pooling: str = "avg") -> Tensor:
    r"""Smooth scores along the last dim with stride-1 pooling and zero padding ``k // 2``.

    .. math::

        \text{avg: } I(j) = \frac{1}{k} \sum_{|t| \le k//2} a(j + t), \qquad
        \text{max: } I(j) = \max_{|t| \le k//2} a(j + t)

    with ``a(j) = 0`` outside the sequence (the zeros count in the average, as in ``avg_pool1d``
    with ``count_include_pad=True``). Pool attention (zeros at padding) *before* masking padded
    positions with ``-inf``.

    Parameters
    ----------
    scores : Tensor
        Finite scores of any shape ``(..., P)`` with ``P >= 1``.
    kernel_size : int
        Odd window length ``k >= 1``; ``1`` returns the scores unchanged.
    pooling : {"avg", "max"}
        Average (SnapKV default) or max pooling.

    Returns
    -------
    Tensor
        Pooled scores, same shape and dtype as ``scores``.
    """
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise TypeError("scores must be a floating-point torch.Tensor")
    if scores.ndim < 1 or scores.shape[-1] < 1:
        raise ValueError(f"scores must have a non-empty last dimension, got shape {tuple(scores.shape)}")
    kernel = _check_pooling(kernel_size, pooling)
    padded = F.pad(scores.reshape(-1, 1, scores.shape[-1]), (kernel // 2, kernel // 2))
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    return pool(padded, kernel, stride=1).reshape(scores.shape)


def window_importance(
    queries: Tensor,
    keys: Tensor,
    *,
    kernel_size: int = 5,
    pooling: str = "avg",
    scaling: float | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    r"""SnapKV importance: pooled window attention, ``I = pool(a)``.

    .. math:: I_h(j) = \operatorname{pool}_k\big(a_h\big)(j)

    with ``a`` from :func:`window_attention` and the pooling of :func:`pool_scores`.

    Parameters
    ----------
    queries, keys, scaling, key_mask
        As in :func:`window_attention`.
    kernel_size, pooling
        As in :func:`pool_scores`.

    Returns
    -------
    Tensor
        ``(B, Hkv, N - W)`` importance, ``-inf`` at padded positions.
    """
    batch, kv_heads, seq_len, head_dim = _check_cache("keys", keys)
    window = _check_queries(queries, batch, kv_heads, seq_len, head_dim)
    _check_pooling(kernel_size, pooling)
    scale = _check_scaling(scaling, head_dim)
    valid = _valid_mask(key_mask, batch, seq_len, keys.device)
    pooled = pool_scores(_window_attention(queries, keys, scale, valid), kernel_size, pooling)
    return _mask_pads(pooled, valid[..., : seq_len - window])


def _value_norm_term(values: Tensor, window: int, prefix_valid: Tensor, target: Tensor) -> Tensor:
    """Validated core of :func:`value_norm_importance`."""
    prefix = values.shape[2] - window
    norms = torch.linalg.vector_norm(values[..., :prefix, :].to(target.dtype), dim=-1)
    return _mask_pads(_rescale(_minmax(norms, prefix_valid, 0.0), prefix_valid, target), prefix_valid)


def value_norm_importance(
    values: Tensor,
    window_size: int,
    target_mean: Tensor,
    *,
    key_mask: Tensor | None = None,
) -> Tensor:
    r"""Value-norm term of the MixKV importance, rescaled to a target mean (spec 1.5).

    .. math::

        n(j) = \lVert v_j \rVert_2, \qquad
        n_{mm}(j) = \frac{n(j) - \min n}{\max n - \min n}, \qquad
        n'(j) = n_{mm}(j) \, \frac{t}{\overline{n_{mm}} + 10^{-8}}

    over the valid prefix positions, with ``t`` = ``target_mean`` of the head. When all norms are
    equal up to rounding (``max n - min n`` within a few machine epsilons of ``max n``) the term is
    ``0`` everywhere instead of NaN or amplified rounding noise (the spec's **(fix)**).

    Parameters
    ----------
    values : Tensor
        ``(B, Hkv, N, D)`` values.
    window_size : int
        ``W``; the last ``W`` positions are not scored.
    target_mean : Tensor
        ``(B, Hkv)`` mean the term is rescaled to (MixKV uses the mean of ``I``).
    key_mask : Tensor, optional
        ``(B, N)`` real-token mask; padded positions are ignored in min, max and mean.

    Returns
    -------
    Tensor
        ``(B, Hkv, N - W)`` values of ``n'``, ``-inf`` at padded positions.
    """
    batch, kv_heads, seq_len, _ = _check_cache("values", values)
    window = _check_window("window_size", window_size, seq_len)
    valid = _valid_mask(key_mask, batch, seq_len, values.device)
    target = _check_target(target_mean, batch, kv_heads, _score_dtype(values, target_mean))
    return _value_norm_term(values, window, valid[..., : seq_len - window], target)


def _unit_keys(keys: Tensor, dtype: torch.dtype) -> Tensor:
    """``k / ||k||`` in ``dtype``; all-zero keys stay zero."""
    return F.normalize(keys.to(dtype), dim=-1)


def _diversity(unit: Tensor, valid: Tensor, window: int, target: Tensor | None) -> Tensor:
    """Validated core of :func:`key_diversity`; ``unit`` are unit keys, ``valid`` is ``(B, 1, N)``."""
    prefix = unit.shape[2] - window
    prefix_valid = valid[..., :prefix]
    total = (unit * valid[..., None]).sum(-2)  # (B, Hkv, D)
    mean_direction = total / valid.sum(-1, keepdim=True).clamp_min(1)
    closeness = torch.einsum("bknd,bkd->bkn", unit[..., :prefix, :], mean_direction)
    diversity = _minmax(-closeness, prefix_valid, DIVERSITY_EPS)
    if target is not None:
        diversity = _rescale(diversity, prefix_valid, target)
    return _mask_pads(diversity, prefix_valid)


def key_diversity(
    keys: Tensor,
    window_size: int,
    target_mean: Tensor | None = None,
    *,
    key_mask: Tensor | None = None,
) -> Tensor:
    r"""Key diversity: distance of each prefix key from its head's mean key direction (spec 2).

    .. math::

        \hat k_j = \frac{k_j}{\lVert k_j \rVert}, \qquad
        \mu = \frac{1}{N} \sum_{j=1}^{N} \hat k_j, \qquad
        c(j) = \hat k_j \cdot \mu, \qquad
        d(j) = \frac{-c(j) - \min(-c)}{\max(-c) - \min(-c) + 10^{-8}}

    The mean ``mu`` runs over all ``N`` valid positions (window included); ``d`` over the valid
    prefix. With ``target_mean`` ``t`` the result is ``d(j) t / (mean(d) + 1e-8)`` (MixKV's
    ``div``); without it, ``d`` itself (KeyDiff's score, in ``[0, 1)``). When ``-c`` is flat up to
    rounding (e.g. all keys parallel) ``d`` is ``0`` everywhere rather than amplified noise.

    Parameters
    ----------
    keys : Tensor
        ``(B, Hkv, N, D)`` keys.
    window_size : int
        ``W``; the last ``W`` positions are not scored.
    target_mean : Tensor, optional
        ``(B, Hkv)`` mean to rescale to.
    key_mask : Tensor, optional
        ``(B, N)`` real-token mask; padded keys are left out of ``mu``, min, max and mean.

    Returns
    -------
    Tensor
        ``(B, Hkv, N - W)`` diversity, ``-inf`` at padded positions.
    """
    batch, kv_heads, seq_len, _ = _check_cache("keys", keys)
    window = _check_window("window_size", window_size, seq_len)
    valid = _valid_mask(key_mask, batch, seq_len, keys.device)
    dtype = _score_dtype(keys) if target_mean is None else _score_dtype(keys, target_mean)
    target = None if target_mean is None else _check_target(target_mean, batch, kv_heads, dtype)
    return _diversity(_unit_keys(keys, dtype), valid, window, target)


def _redundancy(unit: Tensor, valid: Tensor) -> Tensor:
    """Validated core of :func:`head_redundancy`; ``unit`` are unit keys, ``valid`` is ``(B, 1, N)``."""
    masked = unit * valid[..., None]
    self_similarity = masked.square().sum((-2, -1))
    pair_sum = masked.sum(-2).square().sum(-1) - self_similarity
    count = valid.sum(-1).to(unit.dtype)  # (B, 1)
    pairs = count * (count - 1)
    redundancy = pair_sum / pairs.clamp_min(1)
    return torch.where(pairs > 0, redundancy, 0.0).clamp(0.0, 1.0)


def head_redundancy(keys: Tensor, *, key_mask: Tensor | None = None) -> Tensor:
    r"""Head redundancy: mean pairwise cosine similarity of a head's keys, clipped to ``[0, 1]``.

    .. math::

        r = \operatorname{clip}_{[0, 1]} \frac{1}{N (N - 1)} \sum_{i \ne j} \hat k_i \cdot \hat k_j
          = \operatorname{clip}_{[0, 1]} \frac{N \lVert \mu \rVert^2 - 1}{N - 1}

    over the ``N`` valid positions (window included), computed as
    ``(||sum_j k̂_j||^2 - sum_j ||k̂_j||^2) / (N (N - 1))`` so that an all-zero key counts as
    cosine ``0`` with every other key. A head with fewer than two valid keys has ``r = 0`` (no
    pair to compare; MixKV then ranks by importance alone).

    Parameters
    ----------
    keys : Tensor
        ``(B, Hkv, N, D)`` keys.
    key_mask : Tensor, optional
        ``(B, N)`` real-token mask; padded keys are left out.

    Returns
    -------
    Tensor
        ``(B, Hkv)`` redundancy in ``[0, 1]``.
    """
    batch, _, seq_len, _ = _check_cache("keys", keys)
    valid = _valid_mask(key_mask, batch, seq_len, keys.device)
    return _redundancy(_unit_keys(keys, _score_dtype(keys)), valid)


def mix_scores(importance: Tensor, diversity: Tensor, redundancy: Tensor) -> Tensor:
    r"""MixKV's per-head mix of importance and diversity (spec 3).

    .. math:: s_h(j) = r_h \, \mathrm{div}_h(j) + (1 - r_h) \, \mathrm{imp}_h(j)

    ``s`` is ``-inf`` wherever either input is ``-inf`` (padding), also when ``r`` is ``0`` or
    ``1`` (no ``0 * -inf`` NaN).

    Parameters
    ----------
    importance, diversity : Tensor
        ``(B, Hkv, P)`` scores of the same shape.
    redundancy : Tensor
        ``(Hkv,)`` or ``(B, Hkv)`` weights ``r`` in ``[0, 1]``.

    Returns
    -------
    Tensor
        ``(B, Hkv, P)`` mixed scores.
    """
    _check_floating("importance", importance, "(batch, num_kv_heads, prefix_len)")
    _check_floating("diversity", diversity, "(batch, num_kv_heads, prefix_len)")
    if importance.shape != diversity.shape:
        raise ValueError(
            f"importance {tuple(importance.shape)} and diversity {tuple(diversity.shape)} must have the "
            "same shape"
        )
    dtype = torch.promote_types(importance.dtype, diversity.dtype)
    weight = _check_redundancy(redundancy, importance.shape[0], importance.shape[1], dtype)[..., None]
    blocked = torch.isneginf(importance) | torch.isneginf(diversity)
    mixed = weight * diversity.masked_fill(blocked, 0.0) + (1 - weight) * importance.masked_fill(blocked, 0.0)
    return mixed.masked_fill(blocked, -math.inf)


def key_norm_scores(keys: Tensor, window_size: int, *, key_mask: Tensor | None = None) -> Tensor:
    r"""Knorm score: the negated key norm, so that low-norm keys are kept.

    .. math:: s(j) = -\lVert k_j \rVert_2

    Parameters
    ----------
    keys : Tensor
        ``(B, Hkv, N, D)`` keys.
    window_size : int
        ``W``; the last ``W`` positions are not scored.
    key_mask : Tensor, optional
        ``(B, N)`` real-token mask.

    Returns
    -------
    Tensor
        ``(B, Hkv, N - W)`` scores, ``-inf`` at padded positions.
    """
    batch, _, seq_len, _ = _check_cache("keys", keys)
    window = _check_window("window_size", window_size, seq_len)
    valid = _valid_mask(key_mask, batch, seq_len, keys.device)[..., : seq_len - window]
    norms = torch.linalg.vector_norm(keys[..., : seq_len - window, :].to(_score_dtype(keys)), dim=-1)
    return _mask_pads(-norms, valid)


def mixkv_scores(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    *,
    window_size: int = 32,
    kernel_size: int = 5,
    pooling: str = "avg",
    redundancy: Tensor | None = None,
    scaling: float | None = None,
    key_mask: Tensor | None = None,
    importance: Tensor | None = None,
) -> Tensor:
    r"""MixKV selection score of every prefix position (spec 1 to 3).

    .. math::

        \mathrm{imp} = I + n', \qquad
        s = r \, \mathrm{div} + (1 - r) \, \mathrm{imp}

    with ``I`` from :func:`window_importance`, ``n'`` from :func:`value_norm_importance` and
    ``div`` from :func:`key_diversity`, both rescaled to ``mean(I)`` over the valid prefix of each
    head, and ``r`` from :func:`head_redundancy` unless given.

    Parameters
    ----------
    queries, keys, scaling, key_mask
        As in :func:`window_attention`.
    values : Tensor
        ``(B, Hkv, N, D)`` values.
    window_size : int
        ``W``; must equal ``queries.shape[2]``.
    kernel_size, pooling
        As in :func:`pool_scores`.
    redundancy : Tensor, optional
        ``(Hkv,)`` or ``(B, Hkv)`` offline redundancy in ``[0, 1]``; computed online from the keys
        when omitted.
    importance : Tensor, optional
        ``I`` already computed by :func:`window_importance` with the same arguments (a budget
        policy such as AdaKV needs it too); computed here when omitted.

    Returns
    -------
    Tensor
        ``(B, Hkv, N - W)`` mixed scores, ``-inf`` at padded positions.
    """
    batch, kv_heads, seq_len, head_dim = _check_cache("keys", keys)
    window = _check_queries(queries, batch, kv_heads, seq_len, head_dim)
    if as_int("window_size", window_size) != window:
        raise ValueError(
            f"window_size ({window_size}) must equal queries.shape[2] ({window}); pass the queries of the "
            "last window_size positions"
        )
    _check_values(values, batch, kv_heads, seq_len)
    _check_pooling(kernel_size, pooling)
    scale = _check_scaling(scaling, head_dim)
    dtype = _score_dtype(queries, keys, values)
    weight = None if redundancy is None else _check_redundancy(redundancy, batch, kv_heads, dtype)
    valid = _valid_mask(key_mask, batch, seq_len, keys.device)
    prefix_valid = valid[..., : seq_len - window]
    if importance is None:
        pooled = pool_scores(_window_attention(queries, keys, scale, valid).to(dtype), kernel_size, pooling)
        importance = _mask_pads(pooled, prefix_valid)
    elif importance.shape != (batch, kv_heads, seq_len - window):
        raise ValueError(
            f"importance must have shape {(batch, kv_heads, seq_len - window)} (window_importance of the same "
            f"queries and keys), got {tuple(importance.shape)}"
        )
    return _mix_importance(importance, keys, values, window, valid, weight, dtype)


def _mix_importance(
    importance: Tensor,
    keys: Tensor,
    values: Tensor,
    window: int,
    valid: Tensor,
    weight: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """Validated core of :func:`mixkv_mix`: ``r div + (1 - r) (imp + n')`` rescaled to ``mean(imp)``."""
    prefix_valid = valid[..., : keys.shape[2] - window]
    importance = importance.to(dtype)
    target = _masked_mean(importance, prefix_valid)
    unit = _unit_keys(keys, dtype)
    diversity = _diversity(unit, valid, window, target)
    if weight is None:
        weight = _redundancy(unit, valid)
    return mix_scores(importance + _value_norm_term(values, window, prefix_valid, target), diversity, weight)


def mixkv_mix(
    importance: Tensor,
    keys: Tensor,
    values: Tensor,
    window_size: int,
    *,
    redundancy: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    r"""The MixKV mix on any importance score: :func:`mixkv_scores` with ``I`` replaced by ``imp``.

    .. math:: s = r \, \mathrm{div} + (1 - r) \, (\mathrm{imp} + n')

    with ``n'`` and ``div`` rescaled to the mean of ``imp`` over the valid prefix of each head. The
    importance must be finite and non-negative at real positions (an attention-like score: TOVA's,
    ExpectedAttention's), so that its mean sets the scale of the other two terms.

    Parameters
    ----------
    importance : Tensor
        ``(B, Hkv, N - W)`` importance, ``-inf`` at padded positions.
    keys, values : Tensor
        ``(B, Hkv, N, D)``.
    window_size : int
        ``W``; the last ``W`` positions are not scored.
    redundancy, key_mask
        As in :func:`mixkv_scores`.

    Returns
    -------
    Tensor
        ``(B, Hkv, N - W)`` mixed scores, ``-inf`` at padded positions.
    """
    batch, kv_heads, seq_len, _ = _check_cache("keys", keys)
    _check_values(values, batch, kv_heads, seq_len)
    window = _check_window("window_size", window_size, seq_len)
    _check_floating("importance", importance, "(batch, num_kv_heads, prefix_len)")
    if importance.shape != (batch, kv_heads, seq_len - window):
        raise ValueError(
            f"importance must have shape {(batch, kv_heads, seq_len - window)}, got {tuple(importance.shape)}"
        )
    dtype = _score_dtype(importance, keys, values)
    weight = None if redundancy is None else _check_redundancy(redundancy, batch, kv_heads, dtype)
    valid = _valid_mask(key_mask, batch, seq_len, keys.device)
    return _mix_importance(importance, keys, values, window, valid, weight, dtype)


def leading_real_positions(key_mask: Tensor, count: int) -> Tensor:
    """True at the first ``count`` real entries of each row of a bool mask (left padding shifts nothing).

    The attention sinks of StreamingLLM and ExpectedAttention."""
    return key_mask & (key_mask.long().cumsum(-1) <= count)


def sinks_on_top(scores: Tensor, prefix_mask: Tensor, n_sink: int) -> Tensor:
    """``scores`` ``(B, Hkv, P)`` with the first ``n_sink`` real positions of each row
    (:func:`leading_real_positions` of the bool ``prefix_mask``) raised above every other real
    position - to the largest other real score, at least 0, plus one - so a top-k always keeps them."""
    sink = leading_real_positions(prefix_mask, n_sink)
    top = torch.where(prefix_mask & ~sink, scores, -math.inf).amax(-1, keepdim=True)
    return torch.where(sink, top.clamp_min(0.0) + 1, scores)


def last_query_attention(
    queries: Tensor,
    keys: Tensor,
    window_size: int,
    *,
    per_head: bool = False,
    scaling: float | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    r"""TOVA's score: the attention the last prompt token pays to each prefix position.

    .. math::

        a_{h'}(j) = \operatorname{softmax}_j\big(s \, q_{h', N} \cdot k_{h, j}\big), \qquad
        \text{TOVA}(j) = \frac{1}{H} \sum_{h'} a_{h'}(j)

    over all ``N`` real keys, for prefix positions ``j < N - W``: one score shared by every KV
    head (the authors' and kvpress's default). With ``per_head`` the mean runs over the ``g`` query
    heads of each KV head instead.

    Parameters
    ----------
    queries : Tensor
        ``(B, H, Wq, D)`` post-rotary queries of the last positions; only the last one is used.
    keys : Tensor
        ``(B, Hkv, N, D)`` post-rotary keys.
    window_size : int
        ``W``; the last ``W`` positions are not scored.
    per_head : bool
        Average over each KV head's query group instead of over every query head.
    scaling, key_mask
        As in :func:`window_attention`.

    Returns
    -------
    Tensor
        ``(B, Hkv, N - W)`` attention probabilities, ``-inf`` at padded positions.
    """
    batch, kv_heads, seq_len, head_dim = _check_cache("keys", keys)
    _check_queries(queries, batch, kv_heads, seq_len, head_dim)
    window = _check_window("window_size", window_size, seq_len)
    scale = _check_scaling(scaling, head_dim)
    valid = _valid_mask(key_mask, batch, seq_len, keys.device)
    attention = _window_attention(queries[:, :, -1:], keys, scale, valid)[..., : seq_len - window]
    if not per_head:
        attention = attention.mean(1, keepdim=True).expand(-1, kv_heads, -1)
    return _mask_pads(attention, valid[..., : seq_len - window].expand(batch, kv_heads, -1))


def _rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the two halves of the last dim (transformers' layout)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _check_rotary(name: str, cos: object, sin: object, batch: int, length: int, head_dim: int) -> int:
    """Validate ``(B, length, r)`` cos/sin tables of an even ``r <= D``; return ``r``."""
    cos_t = _check_floating(f"{name}_cos", cos, "(batch, positions, rotary_dim)")
    sin_t = _check_floating(f"{name}_sin", sin, "(batch, positions, rotary_dim)")
    rotary = cos_t.shape[-1]
    if cos_t.shape != sin_t.shape or cos_t.shape[0] not in (1, batch) or cos_t.shape[1] != length:
        raise ValueError(
            f"{name}_cos and {name}_sin must both have shape (batch, {length}, rotary_dim) with batch 1 or "
            f"{batch}, got {tuple(cos_t.shape)} and {tuple(sin_t.shape)}"
        )
    if rotary % 2 or rotary > head_dim or rotary == 0:
        raise ValueError(f"rotary_dim must be even and at most head_dim ({head_dim}), got {rotary}")
    return rotary


def unrotate_queries(queries: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    r"""Undo transformers' rotary embedding: the pre-rotary queries of post-rotary ones.

    Rotary embedding maps ``x`` to ``y = x c + rot(x) s`` on the first ``r`` dims (``c``, ``s``:
    the model's cos/sin tables of the positions, attention scaling included; ``rot`` swaps the two
    halves and negates the first); its inverse is

    .. math:: x = \frac{y \, c - \operatorname{rot}(y) \, s}{c^2 + s^2}

    Parameters
    ----------
    queries : Tensor
        ``(B, H, L, D)`` post-rotary queries.
    cos, sin : Tensor
        ``(B or 1, L, r)`` the tables the model rotated them with (``r <= D`` even; the last
        ``D - r`` dims are not rotated, as in partial-rotary models).

    Returns
    -------
    Tensor
        ``(B, H, L, D)`` pre-rotary queries, float32 (float64 for float64 input).
    """
    batch, _, length, head_dim = _check_floating(
        "queries", queries, "(batch, num_heads, positions, head_dim)"
    ).shape
    rotary = _check_rotary("query", cos, sin, batch, length, head_dim)
    dtype = _score_dtype(queries)
    c, s = cos.to(dtype)[:, None], sin.to(dtype)[:, None]
    rotated = queries.to(dtype)[..., :rotary]
    plain = (rotated * c - _rotate_half(rotated) * s) / (c.square() + s.square())
    return torch.cat([plain, queries.to(dtype)[..., rotary:]], dim=-1)


def future_rotary(
    cos_last: Tensor, sin_last: Tensor, inv_freq: Tensor, n_future: int
) -> tuple[Tensor, Tensor]:
    r"""The rotary tables of the ``n_future`` positions after the last one, extrapolated from it.

    With ``phi = atan2(s, c)`` and ``a = sqrt(c^2 + s^2)`` read off the last position's tables and
    ``theta`` the model's inverse frequencies (each repeated for both halves), position
    ``last + t`` has angle ``phi + t theta``:

    .. math:: c_t = a \cos(\phi + t \theta), \quad s_t = a \sin(\phi + t \theta), \quad t = 1 .. F

    This is the 1-D rotary embedding of the next text positions for every model whose text positions
    advance by one per token, M-RoPE included (a text token has the same position on every axis).

    Parameters
    ----------
    cos_last, sin_last : Tensor
        ``(B, r)`` tables of the last position.
    inv_freq : Tensor
        ``(r / 2,)`` inverse frequencies of the rotary embedding.
    n_future : int
        ``F >= 1``.

    Returns
    -------
    tuple of Tensor
        ``(B, F, r)`` cos and sin, float32 (float64 for float64 input).
    """
    future = as_int("n_future", n_future)
    if future < 1:
        raise ValueError(f"n_future_positions must be at least 1, got {future}")
    dtype = _score_dtype(cos_last, sin_last)
    cos_last, sin_last = cos_last.to(dtype), sin_last.to(dtype)
    if inv_freq.shape != (cos_last.shape[-1] // 2,):
        raise ValueError(
            f"inv_freq must have shape ({cos_last.shape[-1] // 2},) (half the rotary dim), got {tuple(inv_freq.shape)}"
        )
    theta = torch.cat([inv_freq, inv_freq]).to(dtype=dtype, device=cos_last.device)
    steps = torch.arange(1, future + 1, dtype=dtype, device=cos_last.device)
    angle = torch.atan2(sin_last, cos_last)[:, None, :] + steps[None, :, None] * theta
    amplitude = torch.sqrt(cos_last.square() + sin_last.square())[:, None, :]
    return amplitude * angle.cos(), amplitude * angle.sin()


def expected_attention(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    future_cos: Tensor,
    future_sin: Tensor,
    window_size: int,
    *,
    n_sink: int = 4,
    use_covariance: bool = True,
    use_vnorm: bool = True,
    epsilon: float = 0.0,
    scaling: float | None = None,
    key_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
) -> Tensor:
    r"""ExpectedAttention's score: the attention future queries are expected to pay each position.

    Queries are modelled as a Gaussian fitted on the given pre-rotary queries (mean ``mu``,
    covariance ``Sigma``, divided by the count), moved to the future by the rotation ``R`` averaged
    over the next ``F`` positions; the expected attention logit of ``q ~ N(R mu, R Sigma R^T)`` is
    the log of ``E[exp(s q . k)]``:

    .. math::

        z_{h'}(j) = s \, (R \mu_{h'}) \cdot k_j + \tfrac{s^2}{2} \, k_j^\top R \Sigma_{h'} R^\top k_j,
        \qquad
        e_h(j) = \frac{1}{g} \sum_{h' \in h} \operatorname{softmax}_j z_{h'}(j), \qquad
        \text{score}(j) = (e_h(j) + \epsilon) \, \lVert v_j \rVert_2

    The softmax runs over every real key but the first ``n_sink`` (attention sinks, which are always
    kept: they score the row's maximum plus one). ``R = mean_t (diag(c_t) + diag(s_t) P)`` with
    ``P x = rot(x)`` on the rotary dims, the identity on the others. With ``s = 1/sqrt(D)`` this is
    kvpress 0.5.5's ``ExpectedAttentionPress`` (Devoto et al., NVIDIA 2025).

    Parameters
    ----------
    queries : Tensor
        ``(B, H, L, D)`` pre-rotary queries to fit the Gaussian on (:func:`unrotate_queries`).
    keys, values : Tensor
        ``(B, Hkv, N, D)`` post-rotary keys and values.
    future_cos, future_sin : Tensor
        ``(B or 1, F, r)`` rotary tables of the future positions (:func:`future_rotary`).
    window_size : int
        ``W``; the last ``W`` positions are not scored.
    n_sink : int
        Leading real tokens left out of the softmax and always kept.
    use_covariance, use_vnorm : bool
        Include the covariance term; weight by the value norm.
    epsilon : float
        Added to ``e`` before the value-norm weighting.
    scaling : float, optional
        Logit scale ``s``; ``1 / sqrt(D)`` by default.
    key_mask : Tensor, optional
        ``(B, N)`` or ``(B, Hkv, N)`` real-entry mask.
    query_mask : Tensor, optional
        ``(B, L)`` real-query mask (padded queries are left out of the Gaussian).

    Returns
    -------
    Tensor
        ``(B, Hkv, N - W)`` scores, ``-inf`` at padded positions.
    """
    batch, kv_heads, seq_len, head_dim = _check_cache("keys", keys)
    _check_values(values, batch, kv_heads, seq_len)
    q = _check_floating("queries", queries, "(batch, num_heads, positions, head_dim)")
    if q.shape[0] != batch or q.shape[3] != head_dim or q.shape[1] % kv_heads:
        raise ValueError(
            f"queries must have shape (batch={batch}, num_heads (a multiple of {kv_heads}), positions, "
            f"head_dim={head_dim}), got {tuple(q.shape)}"
        )
    window = _check_window("window_size", window_size, seq_len)
    sinks = as_int("n_sink", n_sink)
    if sinks < 0:
        raise ValueError(f"n_sink must be >= 0, got {sinks}")
    rotary = _check_rotary("future", future_cos, future_sin, batch, future_cos.shape[1], head_dim)
    scale = _check_scaling(scaling, head_dim)
    dtype = _score_dtype(queries, keys, values)
    valid = _valid_mask(key_mask, batch, seq_len, keys.device).expand(batch, kv_heads, seq_len)
    group = q.shape[1] // kv_heads

    # The Gaussian of the queries.
    weights = torch.ones(batch, q.shape[2], dtype=dtype, device=q.device)
    if query_mask is not None:
        weights = query_mask.to(device=q.device, dtype=dtype)
    count = weights.sum(-1).clamp_min(1)[:, None, None]  # (B, 1, 1)
    q = q.to(dtype)
    mean = torch.einsum("bhld,bl->bhd", q, weights) / count
    centred = (q - mean[:, :, None]) * weights[:, None, :, None]
    cov = torch.einsum("bhli,bhlj->bhij", centred, centred) / count[..., None]

    # The rotation averaged over the future positions.
    eye = torch.eye(head_dim, dtype=dtype, device=q.device)
    swap = torch.zeros(rotary, rotary, dtype=dtype, device=q.device)
    half = rotary // 2
    swap[half:, :half], swap[:half, half:] = torch.eye(half), -torch.eye(half)
    c, s = future_cos.to(dtype).mean(1), future_sin.to(dtype).mean(1)  # (B or 1, r)
    rotation = eye.expand(c.shape[0], head_dim, head_dim).clone()
    rotation[:, :rotary, :rotary] = torch.diag_embed(c) + s[:, :, None] * swap
    mean = torch.einsum("bij,bhj->bhi", rotation.expand(batch, -1, -1), mean)

    grouped_keys = keys.to(dtype).repeat_interleave(group, dim=1)  # (B, H, N, D)
    logits = scale * torch.einsum("bhd,bhnd->bhn", mean, grouped_keys)
    if use_covariance:
        cov = rotation[:, None] @ cov @ rotation.transpose(-1, -2)[:, None]
        logits = logits + scale**2 / 2 * torch.einsum("bhni,bhij,bhnj->bhn", grouped_keys, cov, grouped_keys)
    sink = leading_real_positions(valid, sinks)
    scored = (valid & ~sink).repeat_interleave(group, dim=1)
    probs = logits.masked_fill(~scored, -math.inf).softmax(-1).nan_to_num(0.0)
    score = probs.reshape(batch, kv_heads, group, seq_len).mean(2)
    if use_vnorm:
        score = (score + epsilon) * torch.linalg.vector_norm(values.to(dtype), dim=-1)
    score = score[..., : seq_len - window]
    prefix_valid = valid[..., : seq_len - window]
    return _mask_pads(sinks_on_top(score, prefix_valid, sinks), prefix_valid)


def post_vision_rows(
    visual_mask: Tensor | None, window_size: int, *, key_mask: Tensor | None = None
) -> Tensor:
    r"""The window queries that follow the prompt's last visual token (VL-Cache's post-vision queries).

    Row ``i`` of the window (prompt position ``N - W + i``) is a post-vision query when it is a real
    token placed after every visual (image or video) token of its sequence. A sequence with no
    visual token, or none of whose window rows follows its last visual token, uses every real
    window row (text-only prompts are scored by their last ``W`` queries).

    Parameters
    ----------
    visual_mask : Tensor or None
        ``(B, N)`` bool, True at visual placeholder positions; None for a text-only prompt.
    window_size : int
        ``W``.
    key_mask : Tensor, optional
        ``(B, N)`` (or ``(B, Hkv, N)``) real-token mask; only real window rows are returned.

    Returns
    -------
    Tensor
        ``(B, W)`` bool; every sequence with a real window row has at least one True.
    """
    if visual_mask is None and key_mask is None:
        raise ValueError("post_vision_rows needs visual_mask or key_mask to know the batch and length")
    reference = visual_mask if visual_mask is not None else key_mask
    assert reference is not None
    batch, seq_len = reference.shape[0], reference.shape[-1]
    window = _check_window("window_size", window_size, seq_len)
    device = reference.device
    real = _valid_mask(key_mask, batch, seq_len, device)[:, 0, seq_len - window :]
    if visual_mask is None:
        return real
    if tuple(visual_mask.shape) != (batch, seq_len) or visual_mask.dtype != torch.bool:
        raise ValueError(f"visual_mask must be a bool tensor of shape ({batch}, {seq_len})")
    positions = torch.arange(seq_len, device=device)
    last_visual = torch.where(visual_mask.to(device), positions, -1).max(-1).values  # (B,)
    rows = real & (positions[seq_len - window :][None, :] > last_visual[:, None])
    return torch.where(rows.any(-1, keepdim=True), rows, real)


def post_vision_attention(
    queries: Tensor,
    keys: Tensor,
    rows: Tensor,
    *,
    threshold: float = 0.01,
    scaling: float | None = None,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""VL-Cache's accumulated post-vision attention and the layer's attention sparsity.

    With ``A_{h'} = softmax(s Q_{h'} K_h^T + M)`` over the window rows (mask ``M`` as in
    :func:`window_attention`) and ``R`` the post-vision rows:

    .. math::

        \mathrm{score}_h(j) = \frac{1}{g} \sum_{h' \in h} \sum_{i \in R} A_{h'}[i, j], \qquad
        \gamma = \frac{1}{H |R|} \sum_{h'} \sum_{i \in R}
            \frac{|\{j \le i : A_{h'}[i, j] < \tau \max_{j'} A_{h'}[i, j']\}|}{|\{j \le i\}|}

    i.e. the score is the attention each prefix position receives from the post-vision queries,
    summed over those queries and averaged over the GQA group, and the sparsity ``gamma`` is the
    fraction of the entries a post-vision query can see (real keys, causally) whose probability is
    below ``tau`` (``threshold``) times the row's maximum, averaged over query heads and rows.

    Parameters
    ----------
    queries, keys, scaling, key_mask
        As in :func:`window_attention`.
    rows : Tensor
        ``(B, W)`` bool, the post-vision window rows (:func:`post_vision_rows`); at least one per
        sequence.
    threshold : float
        ``tau`` in ``(0, 1)``; VL-Cache counts an entry as sparse below 1% of its row's maximum.

    Returns
    -------
    scores : Tensor
        ``(B, Hkv, N - W)``, ``-inf`` at padded positions.
    sparsity : Tensor
        ``(B,)`` layer sparsity ``gamma`` in ``[0, 1)``.
    """
    batch, kv_heads, seq_len, head_dim = _check_cache("keys", keys)
    window = _check_queries(queries, batch, kv_heads, seq_len, head_dim)
    scale = _check_scaling(scaling, head_dim)
    if not 0.0 < threshold < 1.0:
        raise ValueError(
            f"threshold must be in (0, 1) (a fraction of the row maximum, e.g. 0.01), got {threshold}"
        )
    if not isinstance(rows, Tensor) or rows.dtype != torch.bool or tuple(rows.shape) != (batch, window):
        raise ValueError(f"rows must be a bool tensor of shape (batch, window) = ({batch}, {window})")
    valid = _valid_mask(key_mask, batch, seq_len, keys.device)
    probs, sees, query_valid = _window_probs(queries, keys, scale, valid)
    used = rows.to(keys.device)[:, None, :] & query_valid  # (B, 1 or Hkv, W)
    if not bool(used.any(-1).all()):
        raise ValueError("every sequence needs at least one real post-vision row (see post_vision_rows)")
    group = probs.shape[2]
    weights = used.to(probs.dtype).expand(batch, kv_heads, window)
    scores = torch.einsum("bkgwn,bkw->bkn", probs, weights)[..., : seq_len - window] / group
    row_max = probs.amax(-1, keepdim=True)
    sparse = (probs < threshold * row_max) & sees[:, :, None]
    fraction = sparse.sum(-1).to(probs.dtype) / sees.sum(-1).clamp_min(1).to(probs.dtype)[:, :, None]
    per_row = fraction.mean(2)  # (B, Hkv, W): mean over the GQA group
    per_head = (per_row * weights).sum(-1) / weights.sum(-1)  # (B, Hkv)
    return _mask_pads(scores, valid[..., : seq_len - window]), per_head.mean(-1)


def reconstruction_attention(
    queries: Tensor,
    context_keys: Tensor,
    repeat_keys: Tensor,
    *,
    start: int = 0,
    end: int | None = None,
    n_sink: int = 0,
    scaling: float | None = None,
    block_rows: int = 256,
) -> Tensor:
    r"""KVzip's score: the most attention a context entry receives while the context is repeated.

    The queries of a repeat prompt (an instruction to repeat the context, then the context's tokens
    again) attend to the context's cache. Each context entry ``j`` in ``[start, end)`` scores

    .. math::

        \text{KVzip}_h(j) = \max_{h' \in G(h)} \max_t \operatorname{softmax}\big(s \, q_{h', t}
        \cdot [k_{h,\,0:n_s};\ k_{h,\,start:end};\ r_{h,\,0:t}]\big)_j

    the softmax running over the first ``n_s = min(n_sink, start)`` context entries, the chunk
    ``[start, end)`` being reconstructed and the repeat prompt's own keys up to ``t`` (causal); the
    max runs over the repeat's queries and the query heads ``G(h)`` of KV head ``h``. With
    ``start = 0`` and ``end = N`` this is exactly the attention of a plain forward over context and
    repeat. This is the restricted softmax of KVzip's chunked scoring (Kim et al. 2025, kvpress
    0.5.5's ``KVzipPress``).

    Parameters
    ----------
    queries : Tensor
        ``(B, H, T, D)`` post-rotary queries of the repeat prompt's ``T`` tokens.
    context_keys : Tensor
        ``(B, Hkv, N, D)`` post-rotary keys of the context.
    repeat_keys : Tensor
        ``(B, Hkv, T, D)`` post-rotary keys of the repeat prompt's tokens.
    start, end : int
        The context entries scored (the chunk being reconstructed); ``end`` defaults to ``N``.
    n_sink : int
        Leading context entries the softmax also covers when ``start > 0``.
    scaling : float, optional
        Logit scale ``s`` (default ``D ** -0.5``).
    block_rows : int
        Queries attended at a time (bounds the memory to ``B H block_rows (N + T)`` floats).

    Returns
    -------
    Tensor
        ``(B, Hkv, end - start)`` float32 scores in ``[0, 1]``.
    """
    batch, kv_heads, seq_len, head_dim = _check_cache("context_keys", context_keys)
    rows = _check_floating("queries", queries, "(batch, heads, tokens, head_dim)")
    if rows.dim() != 4 or rows.shape[0] != batch or rows.shape[3] != head_dim or rows.shape[1] % kv_heads:
        raise ValueError(
            f"queries must be (batch={batch}, heads (a multiple of {kv_heads}), tokens, head_dim={head_dim}), "
            f"got {tuple(rows.shape)}"
        )
    tokens = rows.shape[2]
    repeat = _check_floating("repeat_keys", repeat_keys, "(batch, kv_heads, tokens, head_dim)")
    if tuple(repeat.shape) != (batch, kv_heads, tokens, head_dim):
        raise ValueError(
            f"repeat_keys must be (batch, kv_heads, tokens, head_dim) = {(batch, kv_heads, tokens, head_dim)}, "
            f"got {tuple(repeat.shape)}"
        )
    end = seq_len if end is None else as_int("end", end)
    start = as_int("start", start)
    if not 0 <= start < end <= seq_len:
        raise ValueError(
            f"need 0 <= start < end <= {seq_len} (the context's entries), got start={start}, end={end}"
        )
    n_sink = as_int("n_sink", n_sink)
    if n_sink < 0:
        raise ValueError(f"n_sink must be >= 0, got {n_sink}")
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows must be an integer >= 1, got {block_rows!r}")
    scale = _check_scaling(scaling, head_dim)
    sink = min(n_sink, start)
    width = end - start
    keys = torch.cat([context_keys[:, :, :sink], context_keys[:, :, start:end], repeat], dim=2).float()
    group = rows.shape[1] // kv_heads
    grouped = (rows.float() * scale).view(batch, kv_heads, group, tokens, head_dim)
    # max_t softmax_t(j) = exp(max_t (l_tj - logsumexp_t)): one exp per column at the end
    best = torch.full((batch, kv_heads, width), float("-inf"), dtype=torch.float32, device=keys.device)
    for first in range(0, tokens, block_rows):
        last = min(first + block_rows, tokens)
        count = last - first
        seen = keys[:, :, : sink + width + last]  # later repeat keys are masked for every row here
        block = grouped[:, :, :, first:last].reshape(batch, kv_heads, group * count, head_dim)
        logits = torch.matmul(block, seen.transpose(-1, -2)).view(batch, kv_heads, group, count, -1)
        # causal over the repeat's own keys: query t sees repeat keys 0..t
        future = (
            torch.arange(last, device=keys.device)[None, :]
            > torch.arange(first, last, device=keys.device)[:, None]
        )
        logits[..., sink + width :].masked_fill_(future, float("-inf"))
        normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
        block_best = (logits[..., sink : sink + width] - normaliser).amax(dim=(2, 3))
        best = torch.maximum(best, block_best)
    return best.exp()
