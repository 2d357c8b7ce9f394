"""One registry of method names: ``from_name("mixkv-adakv", budget=128)`` builds the press.

Every command (``mixkv eval | bench | demo | fidelity``) and integration (lm-evaluation-harness,
lmms-eval, :class:`mixkv.CompressedContext`) names its methods here, so a name means the same press
everywhere. ``mixkv presses`` (:mod:`mixkv.commands.presses`) lists the names with their parameters and defaults.

Names
-----
``"full"``
    No press: the full cache (:func:`from_name` returns None).
``"snapkv"``, ``"pyramidkv"``, ``"adakv"``, ``"sparsemm"``, ``"keydiff"``, ``"knorm"``, ``"streamingllm"``, ``"random"``
    The mixkv press of that name.
``"vlcache"``, ``"lookm"``
    The VLM presses :class:`~mixkv.presses.VLCachePress` and :class:`~mixkv.presses.LookMPress`.
``"mixkv-<base>"``
    :class:`~mixkv.presses.MixKVPress` on the base's budget policy (``mixkv-vlcache``: on VL-Cache's
    scores and layer budgets).
``"tova"``, ``"expectedattention"``, ``"mixkv-tova"``, ``"mixkv-expectedattention"``
    TOVA, ExpectedAttention, and the MixKV mix with their score as importance (uniform budgets).
``"kvzip"``, ``"kvzip-global"``
    KVzip: scores from a forward that repeats the context (needs the tokenizer's repeat prompts:
    ``repeat_prompt_ids=`` or :func:`build_press`'s ``tokenizer=``). ``kvzip`` keeps ``budget``
    entries in every KV head (uniform, like the other presses here); ``kvzip-global`` pools every
    layer's and KV head's scores and keeps the best overall (``allocation="global"``, the layout of
    KVzip's paper and kvpress's default), the same mean of ``budget`` per KV head, packed.
``"mixkv-kvzip"``, ``"mixkv-kvzip-global"``
    The MixKV mix with KVzip's score as importance, in ``kvzip``'s and ``kvzip-global``'s budgets
    (:class:`~mixkv.presses.MixKVKVzipPress`).
``"kvpress-snapkv"``, ``"kvpress-adakv"``, ``"kvpress-keydiff"``
    NVIDIA's ``kvpress`` presses run by kvpress itself (only when ``kvpress`` is installed), for
    side-by-side comparisons. They take a compression ratio, derived from ``budget`` as
    ``1 - budget / context_tokens``.
``"<method>@kvpress-<scorer>"``
    A kvpress scorer press's score (``tova``, ``expectedattention``, ``knorm``...) as the importance
    of a mixkv method (``snapkv``: uniform budget; ``pyramidkv``, ``adakv``, ``sparsemm``, and
    ``mixkv-<base>``), run by mixkv: :class:`~mixkv.presses.kvpress_scorers.KvpressScorerPress`.
    Only when kvpress is installed (:func:`kvpress_scorer_press_names` lists them); not in
    :data:`NAMES`, which holds the names that need no optional package.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

from mixkv.presses.attention_scorers import (
    ExpectedAttentionPress,
    MixKVExpectedAttentionPress,
    MixKVTOVAPress,
    TOVAPress,
)
from mixkv.presses.base import BasePress
from mixkv.presses.budget_policies import AdaKVPress, PyramidKVPress, SnapKVPress, SparseMMPress
from mixkv.presses.kvpress_scorers import (
    INSTALL_HINT,
    SCORER_METHODS,
    KvpressScorerPress,
    kvpress_scorer_names,
    scorer_options,
)
from mixkv.presses.kvzip import KVzipPress, MixKVKVzipPress, kvzip_prompt_ids
from mixkv.presses.mixkv import MixKVPress
from mixkv.presses.multimodal import LookMPress, VLCachePress
from mixkv.presses.scorers import KeyDiffPress, KnormPress, RandomPress, StreamingLLMPress

__all__ = [
    "KVPRESS_MASKING_NAMES",
    "KVPRESS_NAMES",
    "NAMES",
    "PressEntry",
    "build_press",
    "from_name",
    "is_method_name",
    "kvpress_available",
    "kvpress_scorer_press_names",
    "list_presses",
    "press_entry",
    "split_scorer_name",
]


@dataclass(frozen=True)
class PressEntry:
    """One method name of the registry.

    Attributes
    ----------
    name
        The method name (``"mixkv-adakv"``).
    description
        What the press keeps, in a few words.
    press_class
        The mixkv press class, or None for ``"full"`` and the kvpress methods.
    fixed
        Constructor arguments the name fixes (``{"base": "adakv"}``); not accepted as options.
    kvpress_options
        For kvpress methods: the options they accept and their defaults.
    """

    name: str
    description: str
    press_class: type[BasePress] | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    kvpress_options: dict[str, Any] | None = None

    @property
    def is_kvpress(self) -> bool:
        return self.kvpress_options is not None

    def parameters(self) -> dict[str, Any]:
        """Options :func:`from_name` accepts for this name, with their defaults (``budget`` and
        ``compression_ratio`` default to None: give one of them)."""
        if self.press_class is KvpressScorerPress:
            method, scorer = self.fixed["method"], self.fixed["scorer"]
            common = {
                f.name: None if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(BasePress)
                if f.init
            }
            return {**common, **_BY_NAME[method].parameters(), **scorer_options(scorer)}
        if self.kvpress_options is not None:
            return {"budget": None, "compression_ratio": None, **self.kvpress_options}
        if self.press_class is None:
            return {}
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self.press_class):
            if f.init and f.name not in self.fixed:
                out[f.name] = None if f.default is dataclasses.MISSING else f.default
        return out


def _mixkv(base: str) -> PressEntry:
    return PressEntry(
        f"mixkv-{base}",
        f"MixKV (importance + diversity by head redundancy) on {base}'s budgets",
        MixKVPress,
        {"base": base},
    )


_ENTRIES: tuple[PressEntry, ...] = (
    PressEntry("full", "no press: the full cache"),
    PressEntry("snapkv", "pooled window attention, uniform budget", SnapKVPress),
    PressEntry("pyramidkv", "SnapKV scores, budgets decreasing with depth", PyramidKVPress),
    PressEntry("adakv", "SnapKV scores, adaptive per-head budgets", AdaKVPress),
    PressEntry("sparsemm", "SnapKV scores, per-head budgets from visual-head scores", SparseMMPress),
    *(_mixkv(base) for base in ("snapkv", "pyramidkv", "adakv", "sparsemm")),
    PressEntry("keydiff", "keys far from the head's mean key", KeyDiffPress),
    PressEntry("knorm", "keys with the smallest norm", KnormPress),
    PressEntry("streamingllm", "first n_sink tokens + the most recent", StreamingLLMPress),
    PressEntry("random", "random eviction (baseline)", RandomPress),
    PressEntry("tova", "the last token's attention, averaged over heads", TOVAPress),
    PressEntry("mixkv-tova", "MixKV with TOVA's score as importance, uniform budget", MixKVTOVAPress),
    PressEntry(
        "expectedattention", "expected attention of future queries x value norm", ExpectedAttentionPress
    ),
    PressEntry(
        "mixkv-expectedattention",
        "MixKV with ExpectedAttention's score as importance, uniform budget",
        MixKVExpectedAttentionPress,
    ),
    PressEntry(
        "kvzip", "the most attention an entry receives while the model repeats the context", KVzipPress
    ),
    PressEntry(
        "kvzip-global",
        "KVzip's scores, the best entries over every layer and KV head (its paper's layout)",
        KVzipPress,
        {"allocation": "global"},
    ),
    PressEntry("mixkv-kvzip", "MixKV with KVzip's score as importance, uniform budget", MixKVKVzipPress),
    PressEntry(
        "mixkv-kvzip-global",
        "MixKV with KVzip's score as importance, in kvzip-global's budgets",
        MixKVKVzipPress,
        {"allocation": "global"},
    ),
    PressEntry("vlcache", "post-vision attention, layer budgets from attention sparsity", VLCachePress),
    _mixkv("vlcache"),
    PressEntry("lookm", "text-prior eviction, evicted entries merged into kept ones", LookMPress),
    PressEntry("kvpress-snapkv", "kvpress's SnapKVPress", kvpress_options={"window_size": 32}),
    PressEntry(
        "kvpress-adakv", "kvpress's AdaKVPress over its SnapKVPress", kvpress_options={"window_size": 32}
    ),
    PressEntry("kvpress-keydiff", "kvpress's KeyDiffPress", kvpress_options={}),
)
_BY_NAME = {entry.name: entry for entry in _ENTRIES}

#: Every method name :func:`from_name` accepts, ``"full"`` first.
NAMES: tuple[str, ...] = tuple(_BY_NAME)
#: The names backed by NVIDIA's ``kvpress`` package.
KVPRESS_NAMES: tuple[str, ...] = tuple(e.name for e in _ENTRIES if e.is_kvpress)
#: The kvpress names whose press masks keys while decoding (head-wise budgets), so that its cache is
#: only right with kvpress's attention patch active (see :func:`kvpress_masks_keys`).
KVPRESS_MASKING_NAMES: tuple[str, ...] = ("kvpress-adakv",)


def list_presses() -> tuple[PressEntry, ...]:
    """Every registered name, in the order of :data:`NAMES`."""
    return _ENTRIES


def kvpress_available() -> bool:
    """Whether NVIDIA's ``kvpress`` can be imported (the ``kvpress-*`` names need it)."""
    try:
        importlib.import_module("kvpress")
    except ImportError:
        return False
    return True


def split_scorer_name(name: str) -> tuple[str, str] | None:
    """``(method, scorer)`` of a ``"<method>@kvpress-<scorer>"`` name, None for any other name."""
    method, at, rest = name.partition("@")
    if not at:
        return None
    if not rest.startswith("kvpress-"):
        raise ValueError(
            f"Method {name!r}: after '@' comes a kvpress scorer, 'kvpress-<scorer>' (e.g. snapkv@kvpress-tova)."
        )
    return method, rest[len("kvpress-") :]


def kvpress_scorer_press_names() -> tuple[str, ...]:
    """Every ``"<method>@kvpress-<scorer>"`` name of the installed kvpress (empty without it)."""
    return tuple(
        f"{method}@kvpress-{scorer}" for scorer in kvpress_scorer_names() for method in SCORER_METHODS
    )


def is_method_name(name: str) -> bool:
    """Whether ``name`` is a method :func:`from_name` knows: one of :data:`NAMES`, or a
    ``<method>@kvpress-<scorer>`` name of the installed kvpress."""
    if name in _BY_NAME:
        return True
    try:
        press_entry(name)
    except ValueError:
        return False
    return True


def press_entry(name: str) -> PressEntry:
    """The :class:`PressEntry` of any method name, ``<method>@kvpress-<scorer>`` included.

    Raises
    ------
    ValueError
        Unknown name; a scorer name whose method takes no kvpress score, without kvpress
        installed, or whose kvpress press is not a scorer (saying why).
    """
    entry = _BY_NAME.get(name)
    if entry is not None:
        return entry
    split = split_scorer_name(name)
    if split is None:
        hint = ""
        if name.startswith("kvpress-"):
            hint = (
                f" kvpress itself runs only {', '.join(KVPRESS_NAMES)}; kvpress's scorer presses run inside "
                f"mixkv as '<method>@{name}' (e.g. 'snapkv@{name}' for a uniform budget)."
            )
        raise ValueError(f"Unknown method {name!r}; choose from: {', '.join(NAMES)}.{hint}")
    method, scorer = split
    if method not in SCORER_METHODS:
        raise ValueError(
            f"Method {name!r}: {method!r} cannot take a kvpress score; before '@' comes one of "
            f"{', '.join(SCORER_METHODS)}."
        )
    options = scorer_options(scorer)  # refuses a missing kvpress, an unknown or non-scorer press
    del options
    return PressEntry(
        name,
        f"kvpress's {scorer} score as the importance of {method}",
        KvpressScorerPress,
        {"method": method, "scorer": scorer},
    )


def from_name(
    name: str, budget: int | None = None, *, context_tokens: int | None = None, **options: Any
) -> Any:
    """The press of a method name, or None for ``"full"``.

    Parameters
    ----------
    name
        One of :data:`NAMES` (``mixkv presses`` lists them).
    budget
        Average kept prompt tokens per KV head per layer, observation window included. Give it or
        ``compression_ratio=`` (not needed for ``"full"``).
    context_tokens
        Prompt tokens that will be prefilled; needed only by the ``kvpress-*`` names given a
        budget, whose compression ratio is ``max(0, 1 - budget / context_tokens)``.
    **options
        The press's own parameters (``window_size=16``, ``floor_ratio=0.3``, ``head_scores=...``),
        see :meth:`PressEntry.parameters`.

    Returns
    -------
    object or None
        A press (``with press(model): ...``): a :class:`~mixkv.presses.BasePress`, or a kvpress
        press for the ``kvpress-*`` names; None for ``"full"``.

    Raises
    ------
    ValueError
        Unknown name, unknown option, missing budget, or a ``kvpress-*`` name without kvpress
        installed or without ``context_tokens``.
    """
    if name == "full":
        return None
    entry = press_entry(name)
    if budget is None and options.get("compression_ratio") is None:
        raise ValueError(f"Method {name!r} needs a budget.")
    unknown = sorted(set(options) - set(entry.parameters()) - {"compression_ratio"})
    if unknown:
        raise ValueError(
            f"Method {name!r} takes no option(s) {unknown}; its options are: "
            f"{', '.join(k for k in entry.parameters() if k != 'budget')}."
        )
    if entry.kvpress_options is not None:
        return _kvpress_press(name, budget, context_tokens, {**entry.kvpress_options, **options})
    assert entry.press_class is not None
    if entry.press_class is KvpressScorerPress:
        return _scorer_press(entry, budget, options)
    return entry.press_class(budget=budget, **entry.fixed, **options)


def build_press(
    method: str,
    budget: int | None,
    *,
    context_tokens: int,
    window_size: int = 32,
    head_scores: torch.Tensor | None = None,
    tokenizer: Any = None,
) -> Any:
    """The press a command runs on one prompt: :func:`from_name` with the commands' shared options.

    ``window_size`` goes to every press that has an observation window, ``head_scores`` to the
    SparseMM-based ones (other names ignore it), the repeat prompts of ``tokenizer``
    (:func:`~mixkv.presses.kvzip.kvzip_prompt_ids`) to KVzip, and kvpress presses get their
    compression ratio from ``budget`` and ``context_tokens``.

    Parameters
    ----------
    method
        One of :data:`NAMES`.
    budget
        Average kept prompt tokens per KV head per layer (ignored for ``"full"``).
    context_tokens
        Number of prompt tokens that will be prefilled; ``kvpress`` presses take a compression
        ratio, derived as ``1 - budget / context_tokens``.
    window_size
        Observation window of the mixkv presses.
    head_scores
        Per-(layer, head) visual-head table for the SparseMM-based methods (e.g. from
        ``mixkv calibrate``).
    tokenizer
        The model's tokenizer, for KVzip's repeat prompts (other names ignore it; without it a
        KVzip press is refused when it enters the model).

    Returns
    -------
    object or None
        A press (``press(model)`` is a context manager), or None for ``"full"``.

    Raises
    ------
    ValueError
        If the method is unknown, needs a budget that is missing, or needs ``kvpress`` which is not
        installed.
    """
    options: dict[str, Any] = {"head_scores": head_scores} if "sparsemm" in method else {}
    entry = press_entry(method) if method != "full" else None
    if entry is not None and "window_size" in entry.parameters():
        options["window_size"] = window_size
    kvzip_family = (
        entry is not None and entry.press_class is not None and issubclass(entry.press_class, KVzipPress)
    )
    if kvzip_family and tokenizer is not None:
        options.update(kvzip_prompt_ids(tokenizer))
    return from_name(method, budget, context_tokens=context_tokens, **options)


def _scorer_press(entry: PressEntry, budget: int | None, options: dict[str, Any]) -> KvpressScorerPress:
    """The :class:`KvpressScorerPress` of a ``<method>@kvpress-<scorer>`` entry: ``options`` split
    between the press, its kvpress scorer and its mixkv method."""
    common_names = {f.name for f in dataclasses.fields(BasePress) if f.init}
    scorer_names = set(scorer_options(entry.fixed["scorer"]))
    common = {k: v for k, v in options.items() if k in common_names}
    return KvpressScorerPress(
        budget=budget,
        **common,
        method=entry.fixed["method"],
        scorer=entry.fixed["scorer"],
        scorer_options={k: v for k, v in options.items() if k in scorer_names and k not in common_names},
        method_options={k: v for k, v in options.items() if k not in scorer_names | common_names},
    )


def _kvpress_press(name: str, budget: int | None, context_tokens: int | None, options: dict[str, Any]) -> Any:
    if not kvpress_available():
        raise ValueError(
            f"Method {name!r} compares against NVIDIA's kvpress, which is not installed; "
            f"`{INSTALL_HINT}` or drop the kvpress-* methods."
        )
    ratio = options.pop("compression_ratio", None)
    if ratio is None:
        if context_tokens is None:
            raise ValueError(
                f"Method {name!r} takes a compression ratio: give compression_ratio=, or budget= with "
                "context_tokens= (the prompt length) to derive it."
            )
        assert budget is not None
        ratio = max(0.0, 1.0 - budget / max(context_tokens, 1))
    kvpress: Any = importlib.import_module("kvpress")
    if name == "kvpress-snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio, **options)
    if name == "kvpress-adakv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, **options))
    return kvpress.KeyDiffPress(compression_ratio=ratio)
