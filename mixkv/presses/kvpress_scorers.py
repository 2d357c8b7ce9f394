"""kvpress's scorer presses as mixkv importance: ``<method>@kvpress-<scorer>``.

NVIDIA's kvpress splits most of its presses into a *score* (``ScorerPress.score(module,
hidden_states, keys, values, attentions, kwargs)``, one number per cached entry and KV head) and one
way of applying it (keep the top ``(1 - compression_ratio)`` of every head, by cutting the cache in
place inside a forward hook). :class:`KvpressScorerPress` calls such a score inside mixkv's own
compression instead, so that kvpress's scorers get mixkv's budget policies (uniform, PyramidKV,
AdaKV, SparseMM, the MixKV mix), its memory-freeing cache and its VLM support.

The scorers are found at run time in the installed kvpress: every subclass of kvpress's
``ScorerPress`` that keeps its ``compress`` (the press *is* its score), named by its class name,
lowercased, without ``Press`` (``TOVAPress`` -> ``tova``, ``ExpectedAttentionPress`` ->
``expectedattention``). Presses that are not scorers (ThinK, DuoAttention, KVzip, the AdaKV
wrapper...) and scorers that change how the score is applied (kvpress's PyramidKV) are refused by
name, with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mixkv.presses.base import BasePress, LayerInputs, ScoringContext
from mixkv.presses.budget_policies import AdaKVPress, PyramidKVPress, SnapKVPress, SparseMMPress
from mixkv.presses.mixkv import MixKVPress

__all__ = [
    "INSTALL_HINT",
    "SCORER_METHODS",
    "KvpressScorerPress",
    "kvpress_scorer_names",
    "scorer_class",
    "scorer_options",
]

#: What to install for the kvpress names.
INSTALL_HINT = "pip install mixkv[kvpress]"

#: The mixkv methods a kvpress score can drive (``<method>@kvpress-<scorer>``): the budget policies
#: (``snapkv`` = the same budget for every layer and head) and MixKV on each.
SCORER_METHODS: tuple[str, ...] = (
    "snapkv",
    "pyramidkv",
    "adakv",
    "sparsemm",
    "mixkv-snapkv",
    "mixkv-pyramidkv",
    "mixkv-adakv",
    "mixkv-sparsemm",
)

#: Options a kvpress scorer shares with the mixkv press (SnapKV's): they take the press's values.
_SHARED = ("window_size", "kernel_size")

_POLICIES: dict[str, type[BasePress]] = {
    "snapkv": SnapKVPress,
    "pyramidkv": PyramidKVPress,
    "adakv": AdaKVPress,
    "sparsemm": SparseMMPress,
}


def _kvpress() -> Any:
    try:
        return importlib.import_module("kvpress")
    except ImportError as error:
        raise ValueError(
            f"the kvpress-* scorers come from NVIDIA's kvpress, which is not installed ({error}); "
            f"`{INSTALL_HINT}` (kvpress 0.5 needs transformers < 5.3)"
        ) from None


def _press_classes() -> dict[str, type]:
    """Every press class kvpress exports, by mixkv's name for it."""
    kvpress = _kvpress()
    out = {}
    for attribute in dir(kvpress):
        cls = getattr(kvpress, attribute)
        if inspect.isclass(cls) and issubclass(cls, kvpress.BasePress) and attribute.endswith("Press"):
            name = attribute[: -len("Press")].lower()
            if name not in ("base", "scorer"):
                out[name] = cls
    return out


def _refusal(cls: Any) -> str | None:
    """Why the kvpress press class cannot be used as a score, or None when it can."""
    kvpress = _kvpress()
    if not issubclass(cls, kvpress.ScorerPress):
        return (
            "it is not a scorer press (not a subclass of kvpress's ScorerPress): it compresses in its own "
            "way, which mixkv cannot split into a score and a budget"
        )
    required = [
        p.name
        for p in list(inspect.signature(cls).parameters.values())
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        return f"it wraps another kvpress press (its constructor requires {', '.join(required)})"
    if cls.compress is not kvpress.ScorerPress.compress:
        return (
            "it overrides ScorerPress.compress (it decides the budgets itself, not only the scores); "
            "mixkv's budget policies replace it"
        )
    return None


def kvpress_scorer_names() -> tuple[str, ...]:
    """The scorer names of the installed kvpress (``tova``, ``knorm``...), sorted; empty without kvpress."""
    try:
        classes = _press_classes()
    except ValueError:
        return ()
    return tuple(sorted(name for name, cls in classes.items() if _refusal(cls) is None))


def scorer_class(scorer: str) -> type:
    """The kvpress scorer press class named ``scorer`` (``"tova"``).

    Raises
    ------
    ValueError
        Without kvpress; for an unknown name (listing the scorers); for a kvpress press that is
        not a scorer, saying why.
    """
    classes = _press_classes()
    cls = classes.get(scorer)
    if cls is None:
        raise ValueError(
            f"the installed kvpress has no press named {scorer!r}; its scorers are: "
            f"{', '.join(kvpress_scorer_names())}"
        )
    reason = _refusal(cls)
    if reason is not None:
        raise ValueError(
            f"kvpress's {cls.__name__} cannot be mixkv importance: {reason}. "
            f"Scorers that can: {', '.join(kvpress_scorer_names())}"
        )
    return cls


def scorer_options(scorer: str) -> dict[str, Any]:
    """The options of a kvpress scorer's constructor and their defaults (not ``compression_ratio``,
    nor ``window_size`` and ``kernel_size``, which are the mixkv press's)."""
    cls = scorer_class(scorer)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.init and not f.name.startswith("_") and f.name not in ("compression_ratio", *_SHARED):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = None
    return out


@contextlib.contextmanager
def _rotary_on(module: Any, rotary_emb: Any) -> Iterator[None]:
    """``module.rotary_emb`` for the duration of the block (kvpress's scorers read it there; kvpress
    sets it for good), as a plain attribute (not a registered submodule), removed afterwards."""
    if rotary_emb is None or hasattr(module, "rotary_emb"):
        yield
        return
    module.__dict__["rotary_emb"] = rotary_emb
    try:
        yield
    finally:
        module.__dict__.pop("rotary_emb", None)


class _PlainRopeKwargs(dict[str, Any]):
    """The forward's keyword arguments, where reading ``position_embeddings`` of a multimodal
    rotary embedding (Qwen-VL's M-RoPE: cos of shape ``(3, B, N, D)``) is refused: kvpress's scorers
    apply cos and sin as plain rotary tables."""

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        if key == "position_embeddings" and isinstance(value, tuple) and value[0].dim() != 3:
            raise ValueError(
                f"this kvpress scorer rotates queries with the model's position embeddings as Llama's plain "
                f"rotary tables, but this model's are multimodal (cos of shape {tuple(value[0].shape)}, "
                "M-RoPE): choose a scorer that uses keys and values only (knorm, keydiff...)"
            )
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


@dataclass
class KvpressScorerPress(BasePress):
    """A kvpress scorer press's score as mixkv importance, under a mixkv budget policy or MixKV.

    mixkv calls kvpress's ``score(module, hidden_states, keys, values, attentions, kwargs)`` on
    each compressed layer with what kvpress's own forward hook would pass (the attention module,
    its input hidden states, the layer's keys and values, the eager attention weights or None, the
    module's forward keyword arguments), keeps the scores of the prefix (everything before the
    observation window, which is always kept) and uses them where the ``method`` uses the SnapKV
    importance ``I``:

    * ``snapkv``: every layer and KV head keeps its ``budget`` best-scored entries, as kvpress's own
      ``ScorerPress`` does with the same budget (when the scorer ranks the window first, as
      SnapKV and TOVA do; otherwise kvpress may drop window entries mixkv always keeps);
    * ``pyramidkv``, ``adakv``, ``sparsemm``: that policy's budgets, AdaKV's computed from the
      kvpress score;
    * ``mixkv-<base>``: the MixKV mix ``r div + (1 - r)(s + n')`` with the kvpress score ``s`` as
      importance, on the base's budgets.

    AdaKV's budgets and the MixKV mix are defined for a non-negative importance; a score with
    negative entries (Knorm's ``-||k||``, KeyDiff's ``-cos``) is shifted by its minimum over the
    layer's heads and prefix (for each sequence), which changes no ranking within a head or across
    the heads of a layer.

    The score needs the whole prompt in the forward that compresses it (kvpress compresses only a
    prefill from position 0): a prompt continuing a cache filled earlier, chunked prefill,
    :class:`~mixkv.DecodingPress`, recorded prompts and padded batches are refused (kvpress's
    scores have no padding mask).

    Parameters
    ----------
    scorer : str, default "knorm"
        The kvpress scorer: its class name lowercased without ``Press`` (``"tova"``,
        ``"expectedattention"``; see :func:`kvpress_scorer_names`).
    method : str, default "snapkv"
        One of :data:`SCORER_METHODS`.
    scorer_options : dict
        Arguments of the kvpress scorer's constructor (``{"n_future_positions": 512}``); its
        ``window_size`` and ``kernel_size``, where it has them, are this press's.
    method_options : dict
        Options of the mixkv method (``{"floor_ratio": 0.2}``, ``{"head_scores": table}``...).

    Paper: the scorer's own (its kvpress docstring cites it); kvpress: NVIDIA,
    https://github.com/NVIDIA/kvpress (0.5.5 tested). Defaults: the scorer's own options, the
    method's own budgets (``window_size=32``, ``kernel_size=5``, average pooling).
    """

    scorer: str = "knorm"
    method: str = "snapkv"
    scorer_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    _inner: BasePress = field(init=False, repr=False, compare=False)
    _kvpress_press: Any = field(init=False, repr=False, compare=False)
    _initialised_for: int | None = field(default=None, init=False, repr=False, compare=False)

    needs_layer_inputs = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in SCORER_METHODS:
            raise ValueError(
                f"method {self.method!r} cannot take a kvpress score; choose one of {', '.join(SCORER_METHODS)}"
            )
        cls = scorer_class(self.scorer)
        options = dict(self.scorer_options)
        names = {f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
        shared = sorted(set(options) & set(_SHARED))
        if shared:
            raise ValueError(
                f"give {shared} as the press's own option(s), not as kvpress scorer options: the scorer "
                "takes the press's observation window and pooling kernel"
            )
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(
                f"kvpress's {cls.__name__} takes no option(s) {unknown}; its options are: "
                f"{', '.join(sorted(names - {'compression_ratio', *_SHARED}))}"
            )
        options.update({name: getattr(self, name) for name in _SHARED if name in names})
        try:
            self._kvpress_press = cls(**options)
        except (TypeError, AssertionError) as error:
            raise ValueError(f"kvpress's {cls.__name__} cannot be built with {options}: {error}") from None
        common: dict[str, Any] = {
            "budget": self.budget,
            "compression_ratio": self.compression_ratio,
            "window_size": self.window_size,
            "kernel_size": self.kernel_size,
            "pooling": self.pooling,
        }
        if self.method.startswith("mixkv-"):
            base: Any = self.method[len("mixkv-") :]
            self._inner = MixKVPress(**common, base=base, **self.method_options)
        else:
            self._inner = _POLICIES[self.method](**common, **self.method_options)

    @property
    def name(self) -> str:
        """The registry name of this press (``"adakv@kvpress-tova"``)."""
        return f"{self.method}@kvpress-{self.scorer}"

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        self._inner.check_model(num_layers, num_heads, num_kv_heads)

    def head_budgets(self, ctx: ScoringContext) -> torch.Tensor:
        self._use_kvpress_score(ctx)
        return self._inner.head_budgets(ctx)

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        self._use_kvpress_score(ctx)
        return self._inner.scores(ctx)

    def _use_kvpress_score(self, ctx: ScoringContext) -> None:
        """Put the kvpress score of the prefix in ``ctx``'s importance (once per context)."""
        if ctx.importance_source != self.name:
            ctx._importance = self.kvpress_importance(ctx)
            ctx.importance_source = self.name

    def kvpress_importance(self, ctx: ScoringContext) -> torch.Tensor:
        """The kvpress score of every prefix position ``(B, Hkv, N - W)``, non-negative (see the
        class docstring).

        Raises
        ------
        ValueError
            Without the layer's inputs, when the forward does not hold the whole prompt, for a
            padded batch, or when the scorer cannot score this layer (it says why).
        """
        inputs = ctx.layer_inputs
        keys, values = ctx.keys, ctx.values
        length = keys.shape[2]
        label = f"{self.name} (kvpress's {type(self._kvpress_press).__name__})"
        if inputs is None:
            raise ValueError(
                f"{label} scores from the attention module's inputs, which this compression was not given: "
                "run it as `with press(model): model(...)` on a whole prompt (not on a recorded prompt)"
            )
        if inputs.hidden_states.shape[1] != length:
            raise ValueError(
                f"{label} scores a prompt prefilled in one forward from position 0, as kvpress does; this "
                f"forward holds {inputs.hidden_states.shape[1]} of the layer's {length} entries (a prefix "
                "cached earlier, a chunked prefill or decoding): prefill the whole prompt under the press"
            )
        if not bool(ctx.head_mask.all()):
            raise ValueError(
                f"{label}: kvpress's scores have no padding mask; run padded sequences one at a time"
            )
        self._initialise(inputs)
        kwargs = _PlainRopeKwargs(inputs.forward_kwargs)
        try:
            with _rotary_on(inputs.module, inputs.rotary_emb):
                score = self._kvpress_press.score(
                    inputs.module, inputs.hidden_states, keys, values, inputs.attentions, kwargs
                )
        except (AssertionError, KeyError, NotImplementedError) as error:
            hint = (
                " (it may need the attention weights: load the model with attn_implementation='eager')"
                if inputs.attentions is None
                else ""
            )
            raise ValueError(f"{label} cannot score layer {ctx.layer_idx}: {error!r}{hint}") from None
        expected = tuple(keys.shape[:3])
        if tuple(score.shape) != expected:
            raise ValueError(
                f"{label} returned scores of shape {tuple(score.shape)} for keys of shape {tuple(keys.shape)}; "
                f"expected {expected}"
            )
        prefix = score[..., : length - ctx.window_size].float()
        low = prefix.flatten(1).amin(-1)
        shift = torch.where(low < 0, low, torch.zeros_like(low))
        return prefix - shift[:, None, None]

    def _initialise(self, inputs: LayerInputs) -> None:
        """kvpress's ``post_init_from_model`` once per model (QFilter and KVzap load their
        calibration there, from the Hugging Face hub)."""
        model_id = id(inputs.model)
        if self._initialised_for == model_id:
            return
        try:
            self._kvpress_press.post_init_from_model(inputs.model)
        except Exception as error:  # any failure of a foreign initialisation is refused
            raise ValueError(
                f"{self.name}: kvpress's {type(self._kvpress_press).__name__} prepares itself for the model "
                f"(post_init_from_model) and failed: {error!r}. Scorers calibrated per model (QFilter, "
                "KVzap) download their weights from the Hugging Face hub: they cannot run offline"
            ) from None
        self._initialised_for = model_id
