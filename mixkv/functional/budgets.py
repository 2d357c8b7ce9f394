"""Token budgets per layer and per KV head: PyramidKV, AdaKV and SparseMM (spec 5).

A *budget* ``B`` is the average number of prompt tokens kept per KV head per layer, the
observation window of ``W`` tokens included. Every policy distributes *prefix* tokens: it works on
``base = B - W`` per head, makes the total exact with :func:`allocate_exact` (the spec's **(fix)**
for the drift of integer rounding), and adds the ``W`` window tokens back. All budgets are
``torch.long`` tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixkv.functional.checks import as_int

__all__ = [
    "adaptive_head_budgets",
    "allocate_exact",
    "group_head_scores",
    "head_score_budgets",
    "pyramid_budgets",
    "running_density_budget",
]

_TIE_DECIMALS = 9
"""Remainders are compared after rounding to this many decimals, so that rounding noise of the
water level does not decide between equal remainders (those go to the lower index)."""


def _bound(name: str, bound: int | Tensor, like: Tensor) -> Tensor:
    """Broadcast an integer bound to ``like``'s shape as a flat long tensor."""
    if isinstance(bound, Tensor):
        if bound.is_floating_point() or bound.is_complex() or bound.dtype == torch.bool:
            raise TypeError(f"{name} must be an int or an integer tensor, got dtype {bound.dtype}")
        try:
            expanded = torch.broadcast_to(bound.to(like.device, torch.long), like.shape)
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(bound.shape)} cannot be broadcast to ideal's shape "
                f"{tuple(like.shape)}"
            ) from None
        return expanded.flatten()
    return torch.full((like.numel(),), as_int(name, bound), dtype=torch.long, device=like.device)


def _water_level(ideal: Tensor, low: Tensor, high: Tensor, total: int) -> Tensor:
    """Exact shift ``lam`` with ``f(lam) = sum_i clip(ideal_i + lam, low_i, high_i) = total``.

    ``f`` is piecewise linear and non-decreasing: entry ``i`` rises with slope 1 between
    ``low_i - ideal_i`` and ``high_i - ideal_i``. ``f`` is evaluated at all these breakpoints by
    accumulating slope times step, and interpolated between the two that bracket ``total``.
    """
    points, order = torch.cat([low - ideal, high - ideal]).sort()
    ones = torch.ones_like(ideal)
    slope = torch.cat([ones, -ones])[order].cumsum(0)  # slope of f just right of each breakpoint
    levels = low.sum() + torch.cat([ideal.new_zeros(1), (slope[:-1] * points.diff()).cumsum(0)])
    after = int((levels < total).sum())  # first breakpoint with f >= total
    if after == 0:
        return points[0]
    if after == points.numel():  # f(last) = sum(high) >= total, short of it only by rounding
        return points[-1]
    rise = levels[after] - levels[after - 1]
    return points[after - 1] + (total - levels[after - 1]) * (points[after] - points[after - 1]) / rise


def allocate_exact(
    ideal: Tensor,
    total: int,
    *,
    minimum: int | Tensor = 0,
    maximum: int | Tensor,
) -> Tensor:
    r"""Integers in ``[minimum, maximum]`` that sum exactly to ``total`` and stay close to ``ideal``.

    First the real-valued allocation closest to ``ideal`` (Euclidean projection onto the bounded
    simplex) is found:

    .. math::

        y_i = \operatorname{clip}(\mathrm{ideal}_i + \lambda, \mathrm{min}_i, \mathrm{max}_i),
        \qquad \sum_i y_i = \mathrm{total},

    i.e. whatever clipped entries cannot take (or must keep) is spread evenly over the others.
    Then ``y`` is rounded by the largest-remainder rule: every entry gets ``floor(y_i)`` and the
    ``total - sum floor(y)`` missing units go to the largest fractional parts (ties to the lower
    flat index). With bounds common to all entries the order of ``ideal`` is kept: a larger ideal
    never gets fewer tokens.

    Parameters
    ----------
    ideal : Tensor
        Finite, non-empty real-valued targets of any shape.
    total : int
        Required sum of the result.
    minimum, maximum : int or Tensor
        Inclusive integer bounds, broadcastable to ``ideal``.

    Returns
    -------
    Tensor
        ``torch.long`` tensor of ``ideal``'s shape.

    Raises
    ------
    ValueError
        If ``total`` is outside ``[sum(minimum), sum(maximum)]`` or a minimum exceeds its maximum.
    """
    if not isinstance(ideal, Tensor) or not ideal.is_floating_point():
        raise TypeError("ideal must be a floating-point torch.Tensor")
    if ideal.numel() == 0:
        raise ValueError("ideal must not be empty")
    if not bool(torch.isfinite(ideal).all()):
        raise ValueError("ideal must be finite (no NaN or inf)")
    goal = as_int("total", total)
    low = _bound("minimum", minimum, ideal)
    high = _bound("maximum", maximum, ideal)
    if bool((low > high).any()):
        raise ValueError("every minimum must be <= its maximum")
    floor_sum, ceiling_sum = int(low.sum()), int(high.sum())
    if not floor_sum <= goal <= ceiling_sum:
        raise ValueError(
            f"total={goal} is infeasible: it must lie between sum(minimum)={floor_sum} and "
            f"sum(maximum)={ceiling_sum}; change the total or the bounds"
        )
    target = ideal.detach().flatten().to(torch.float64)
    real_low, real_high = low.to(torch.float64), high.to(torch.float64)
    real = (target + _water_level(target, real_low, real_high, goal)).clamp(real_low, real_high)
    counts = real.floor().long()
    fraction = torch.round(real - counts, decimals=_TIE_DECIMALS)
    # Normally one pass of "+1 to the largest remainders"; the loop (and the -1 branch) only
    # absorbs floating-point error of the water level.
    while (gap := goal - int(counts.sum())) != 0:
        if gap > 0:
            room = counts < high
            order = torch.argsort(torch.where(room, -fraction, torch.inf), stable=True)
            step = 1
        else:
            room = counts > low
            order = torch.argsort(torch.where(room, fraction, torch.inf), stable=True)
            step = -1
        chosen = order[: min(abs(gap), int(room.sum()))]
        counts[chosen] += step
        fraction[chosen] -= step
    return counts.reshape(ideal.shape)


def _check_budget(budget: int, window_size: int) -> int:
    """Validate ``budget > window_size >= 1`` and return the prefix budget ``B - W``."""
    window = as_int("window_size", window_size)
    if window < 1:
        raise ValueError(f"window_size must be at least 1, got {window}")
    kept = as_int("budget", budget)
    if kept <= window:
        raise ValueError(
            f"budget must be larger than window_size (got budget={kept}, window_size={window}): the budget "
            "counts the always-kept window, so raise the budget or shrink the window"
        )
    return kept - window


def _check_prefix(seq_len: int, window_size: int) -> int:
    """Validate ``seq_len > window_size`` and return the prefix length ``N - W``."""
    length = as_int("seq_len", seq_len)
    if length <= window_size:
        raise ValueError(
            f"seq_len ({length}) must be larger than window_size ({window_size}); prompts that short "
            "are not compressed"
        )
    return length - window_size


def _check_scores(name: str, scores: object) -> Tensor:
    """Validate a finite, non-negative 2-D score table with a positive sum."""
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if scores.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_layers, num_heads), got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    if bool((scores < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    if not scores.sum() > 0:
        raise ValueError(f"{name} must have a positive sum")
    return scores


def _check_ratio(name: str, ratio: float) -> float:
    """Validate a ratio in ``[0, 1]``."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"{name} must lie in [0, 1], got {ratio}")
    return float(ratio)


def pyramid_budgets(
    num_layers: int,
    budget: int,
    window_size: int,
    seq_len: int,
    *,
    beta: float = 20,
) -> Tensor:
    r"""PyramidKV budgets per layer: a linear schedule, more tokens in lower layers (spec 5).

    With ``base = B - W`` and prefix length ``P = N - W``, the real-valued schedule is

    .. math::

        \mathrm{lo} = \mathrm{base} / \beta, \quad \mathrm{hi} = 2\,\mathrm{base} - \mathrm{lo}
        \quad (\text{if } \mathrm{hi} > P: \mathrm{hi} = P,\ \mathrm{lo} = 2\,\mathrm{base} - P),
        \qquad y_l = \mathrm{hi} - l \, \frac{\mathrm{hi} - \mathrm{lo}}{L - 1},

    whose mean is ``base``. It is rounded with :func:`allocate_exact` to a total of exactly
    ``L * min(base, P)`` prefix tokens, each layer in ``[0, P]`` (the spec's **(fix)** of the
    integer ``step`` drift); ``W`` is added back. One layer gets ``B``; budgets are non-increasing
    in ``l``. If the prompt fits the budget (``N <= B``) every layer keeps all ``N`` tokens.

    Parameters
    ----------
    num_layers : int
        ``L >= 1``.
    budget : int
        ``B > W``, the average kept tokens per head per layer, window included.
    window_size : int
        ``W >= 1``.
    seq_len : int
        Prompt length ``N > W`` (of this prompt: recompute per prompt).
    beta : float
        Steepness ``beta > 0``; the last layer gets ``base / beta`` prefix tokens.

    Returns
    -------
    Tensor
        ``(L,)`` long budgets, window included.
    """
    base = _check_budget(budget, window_size)
    prefix = _check_prefix(seq_len, window_size)
    layers = as_int("num_layers", num_layers)
    if layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {layers}")
    if not beta > 0:
        raise ValueError(f"beta must be positive (default 20), got {beta}")
    low = base / beta
    high = 2 * base - low
    if high > prefix:
        high = prefix
        low = 2 * base - prefix
    ideal = torch.linspace(high, low, layers, dtype=torch.float64)
    return allocate_exact(ideal, layers * min(base, prefix), maximum=prefix) + window_size


def adaptive_head_budgets(
    importance: Tensor,
    budget: int,
    window_size: int,
    *,
    floor_ratio: float = 0.2,
    mass_scaling: bool = True,
) -> Tensor:
    r"""AdaKV budgets for the KV heads of one layer and one sequence (spec 5).

    With ``base = B - W``, floor ``f = int(floor_ratio * base)`` and ``n_h`` selectable (finite)
    prefix positions of head ``h``:

    1. Sort each head's scores descending. With ``mass_scaling`` multiply head ``h``'s scores by
       the share of its importance mass held by its own top-``base`` entries,
       ``m_h = sum_{top base} I_h / sum I_h`` (``1`` for a head of zero mass). A head whose top
       ``base`` entries already hold its whole mass is not penalised; a head with spread-out mass
       competes with proportionally lower scores.
    2. Take the top ``T = min(Hkv * base, sum_h n_h)`` scaled entries over all heads together;
       ``c_h`` is how many belong to head ``h``.
    3. Ideal prefix budget ``y_h = (1 - floor_ratio) c_h + f``; round with :func:`allocate_exact` to
       a total of exactly ``T`` (the spec's **(fix)**), each head in ``[min(f, n_h), n_h]``.

    Parameters
    ----------
    importance : Tensor
        ``(Hkv, P)`` non-negative base-method importance ``I`` (not the mixed score); ``-inf``
        marks positions that cannot be selected (padding).
    budget : int
        ``B > W``, the average kept tokens per head, window included.
    window_size : int
        ``W >= 1``.
    floor_ratio : float
        Share of ``base`` every head gets regardless of its scores, in ``[0, 1]``.
    mass_scaling : bool
        Apply the scaling of step 1.

    Returns
    -------
    Tensor
        ``(Hkv,)`` long budgets, window included; they sum to ``Hkv * B`` unless the heads have
        fewer selectable positions than that.
    """
    base = _check_budget(budget, window_size)
    floor_share = _check_ratio("floor_ratio", floor_ratio)
    if not isinstance(importance, Tensor) or not importance.is_floating_point():
        raise TypeError("importance must be a floating-point torch.Tensor")
    if importance.ndim != 2:
        raise ValueError(
            f"importance must have shape (num_kv_heads, prefix_len), got {tuple(importance.shape)}"
        )
    selectable = ~torch.isneginf(importance)
    if bool(torch.isnan(importance).any() | torch.isposinf(importance).any()):
        raise ValueError("importance must be finite, or -inf where a position cannot be selected")
    if bool((importance[selectable] < 0).any()):
        raise ValueError("importance must be non-negative (use attention-based scores, not the mixed score)")
    kv_heads, prefix = importance.shape
    available = selectable.sum(-1)
    ranked = importance.to(torch.float64).sort(dim=-1, descending=True).values
    if mass_scaling:
        mass = ranked.masked_fill(torch.isneginf(ranked), 0.0)
        total_mass = mass.sum(-1)
        share = torch.where(total_mass > 0, mass[:, :base].sum(-1) / total_mass, 1.0)
        ranked = ranked * share[:, None]
    taken = min(kv_heads * base, int(available.sum()))
    winners = torch.argsort(ranked.flatten(), descending=True, stable=True)[:taken]
    chosen = torch.bincount(winners // prefix, minlength=kv_heads).to(torch.float64)
    floor = int(floor_share * base)
    ideal = chosen * (1 - floor_share) + floor
    counts = allocate_exact(ideal, taken, minimum=available.clamp(max=floor), maximum=available)
    return counts + window_size


def head_score_budgets(
    head_scores: Tensor,
    budget: int,
    window_size: int,
    seq_len: int,
    *,
    min_ratio: float = 0.1,
) -> Tensor:
    r"""SparseMM budgets per (layer, KV head) from offline head scores (spec 5).

    With ``base = B - W``, prefix length ``P = N - W``, normalised scores
    ``p = head_scores / sum(head_scores)`` and ``m = int(min_ratio * base)``:

    .. math:: y_{l,h} = m + p_{l,h} \, (\mathrm{base} - m) \, L \, H_{kv}

    rounded with :func:`allocate_exact` to a total of exactly ``L * Hkv * min(base, P)`` (the
    spec's **(fix)**), each entry in ``[min(m, P), P]``; tokens a capped head cannot take are spread
    evenly over the others. ``W`` is added back.

    Parameters
    ----------
    head_scores : Tensor
        ``(L, Hkv)`` non-negative scores per KV head (see :func:`group_head_scores`).
    budget : int
        ``B > W``, the average kept tokens per head per layer, window included.
    window_size : int
        ``W >= 1``.
    seq_len : int
        Prompt length ``N > W``.
    min_ratio : float
        Share of ``base`` every head gets regardless of its score, in ``[0, 1]``.

    Returns
    -------
    Tensor
        ``(L, Hkv)`` long budgets, window included.
    """
    base = _check_budget(budget, window_size)
    prefix = _check_prefix(seq_len, window_size)
    share = _check_ratio("min_ratio", min_ratio)
    scores = _check_scores("head_scores", head_scores).to(torch.float64)
    minimum = int(share * base)
    ideal = minimum + scores / scores.sum() * ((base - minimum) * scores.numel())
    total = scores.numel() * min(base, prefix)
    return allocate_exact(ideal, total, minimum=min(minimum, prefix), maximum=prefix) + window_size


def group_head_scores(query_head_scores: Tensor, num_kv_heads: int) -> Tensor:
    r"""Sum per-query-head scores within each GQA group, after normalising them to sum 1.

    .. math:: S_{l,h} = \sum_{i \in h} \frac{s_{l,i}}{\sum_{l',i'} s_{l',i'}}

    where query head ``i`` belongs to KV head ``i // (H / Hkv)``.

    Parameters
    ----------
    query_head_scores : Tensor
        ``(L, H)`` non-negative scores per (layer, query head).
    num_kv_heads : int
        ``Hkv``; must divide ``H``.

    Returns
    -------
    Tensor
        ``(L, Hkv)`` scores summing to 1, in the input's dtype.
    """
    scores = _check_scores("query_head_scores", query_head_scores)
    kv_heads = as_int("num_kv_heads", num_kv_heads)
    layers, heads = scores.shape
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(
            f"num_kv_heads ({kv_heads}) must be a positive divisor of the number of query heads ({heads})"
        )
    return (scores / scores.sum()).reshape(layers, kv_heads, heads // kv_heads).sum(-1)


def running_density_budget(
    density: Tensor,
    density_sum: Tensor,
    layers_seen: int,
    layers_left: int,
    remaining: Tensor,
    available: Tensor,
) -> Tensor:
    r"""VL-Cache's layer share of the prefix budget, allocated as layers are compressed, in order.

    VL-Cache gives layer ``l`` a share of the total budget proportional to its attention density
    ``d_l = 1 - gamma_l``. A layer is compressed as soon as its attention is computed, before the
    later layers' densities are known, so this gives layer ``l`` (with ``n`` layers left, itself
    included) the density-proportional share of the remaining prefix budget ``R`` with every unseen
    layer assumed at the mean density ``d-bar`` of the layers seen so far (``l`` included):

    .. math::

        p_l = \operatorname{clip}\Big(\Big\lfloor R \, \frac{d_l}{d_l + (n - 1) \bar d} + \tfrac12
            \Big\rfloor, 0, \min(R, \mathrm{available}_l)\Big)

    and the last layer takes what remains (``n = 1``), so the total over layers is exact unless the
    last layers hold fewer entries than remain.

    Parameters
    ----------
    density : Tensor
        ``(B,)`` density ``d_l`` of this layer, in ``(0, 1]``.
    density_sum : Tensor
        ``(B,)`` sum of the densities of the layers seen so far, this one included.
    layers_seen : int
        Layers seen so far, this one included (``>= 1``).
    layers_left : int
        Layers still to compress, this one included (``>= 1``).
    remaining : Tensor
        ``(B,)`` long, prefix budget not yet given to earlier layers.
    available : Tensor
        ``(B,)`` long, real prefix entries this layer holds.

    Returns
    -------
    Tensor
        ``(B,)`` long prefix entries this layer keeps (its budget minus the window).
    """
    seen = as_int("layers_seen", layers_seen)
    left = as_int("layers_left", layers_left)
    if seen < 1 or left < 1:
        raise ValueError(f"layers_seen and layers_left must be >= 1, got {seen} and {left}")
    if bool((density <= 0).any()):
        raise ValueError("density must be positive (1 - sparsity, and a row's maximum is never sparse)")
    cap = torch.minimum(remaining, available).clamp_min(0)
    mean = density_sum.to(torch.float64) / seen
    share = density.to(torch.float64) / (density.to(torch.float64) + (left - 1) * mean)
    ideal = torch.floor(remaining.to(torch.float64) * share + 0.5).long()
    return torch.minimum(ideal.clamp_min(0), cap)


def pooled_head_budgets(scores: Tensor, slots: int) -> Tensor:
    r"""Prefix entries each (layer, KV head) keeps when the best ``slots`` entries are taken over all
    of them together: kvpress's global pooling (KVzip's default layout).

    ``c_{l,h} = |\{ j : s_{l,h,j} \in \operatorname{top}_{slots}(s) \}|``, over the finite scores
    only (``-inf`` marks entries that cannot be kept); ties are broken by ``torch.topk``.

    Parameters
    ----------
    scores : Tensor
        ``(L, Hkv, P)`` scores of the prefix entries of every layer and KV head.
    slots : int
        Entries kept in all; at most the number of finite scores is kept.

    Returns
    -------
    Tensor
        ``(L, Hkv)`` long counts summing to ``min(slots, finite entries)``.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 3:
        raise ValueError(
            f"scores must be a (layers, kv_heads, positions) tensor, got {getattr(scores, 'shape', scores)!r}"
        )
    slots = as_int("slots", slots)
    if slots < 0:
        raise ValueError(f"slots must be >= 0, got {slots}")
    flat = scores.reshape(-1)
    taken = min(slots, int(torch.isfinite(flat).sum()))
    counts = torch.zeros(flat.numel(), dtype=torch.long, device=scores.device)
    counts[flat.topk(taken).indices] = 1
    return counts.view(scores.shape).sum(-1)
