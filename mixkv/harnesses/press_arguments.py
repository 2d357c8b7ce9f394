"""What every harness model shares: the press arguments it takes
(``press=mixkv-adakv,budget=128,window_size=16``), the refusal of unknown ones, the default device
and dtype, and the compression statistics a run records in its results."""

from __future__ import annotations

import contextlib
import difflib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mixkv.integration.session import PressSession
from mixkv.presses.base import BasePress
from mixkv.presses.compression_report import CompressionReport
from mixkv.presses.registry import KVPRESS_NAMES, NAMES, from_name, list_presses

__all__ = [
    "DEFAULT_PRESS",
    "HARNESS_PRESS_NAMES",
    "PressRun",
    "RunTotals",
    "attached",
    "default_device",
    "default_dtype",
    "press_options",
    "split_press_arguments",
    "unknown_arguments_error",
]

#: The press of a harness model given no ``press=`` argument.
DEFAULT_PRESS = "mixkv-snapkv"
#: The press names the harness models accept (every mixkv name; the kvpress ones are refused).
HARNESS_PRESS_NAMES: tuple[str, ...] = tuple(name for name in NAMES if name not in KVPRESS_NAMES)
_ALL_PRESS_OPTIONS = frozenset(
    {"budget", "compression_ratio"}.union(*(entry.parameters() for entry in list_presses()))
)


def press_options(name: str) -> tuple[str, ...]:
    """The options press ``name`` takes as model arguments (``budget``, ``compression_ratio`` and
    the press's own parameters; none for ``full``)."""
    if name == "full":
        return ()
    entry = {e.name: e for e in list_presses()}[name]
    return (
        "budget",
        "compression_ratio",
        *(k for k in entry.parameters() if k not in ("budget", "compression_ratio")),
    )


@dataclass(frozen=True)
class RunTotals:
    """The sums a :class:`PressRun` keeps: prompts prefilled under the press, their context tokens,
    their mean kept tokens per KV head, and the KV-cache bytes of the full and compressed caches."""

    sequences: int
    context_tokens: float
    kept_tokens: float
    full_bytes: int
    compressed_bytes: int


@dataclass
class PressRun:
    """A harness model's press and what it did over the requests it ran.

    Attributes
    ----------
    name
        The press name (``"full"`` for none).
    options
        The press options given as model arguments (``budget`` included).
    press
        The press, None for ``full``.
    """

    name: str
    options: dict[str, Any]
    press: BasePress | None
    _sequences: int = field(default=0, init=False)
    _context_tokens: float = field(default=0.0, init=False)
    _kept_tokens: float = field(default=0.0, init=False)
    _full_bytes: int = field(default=0, init=False)
    _compressed_bytes: int = field(default=0, init=False)

    def forget_report(self) -> None:
        """Clear the press's ``last_report`` (before a prefill, so that a stale one is never recorded)."""
        if self.press is not None:
            self.press.last_report = None

    def record(self, report: CompressionReport | None = None) -> None:
        """Add a prefill's report (default: the press's ``last_report``; nothing when there is none)."""
        if report is None and self.press is not None:
            report = self.press.last_report
        if report is None:
            return
        kept = report.kept_tokens.float()
        for i, length in enumerate(report.context_lengths):
            self._sequences += 1
            self._context_tokens += float(length)
            self._kept_tokens += float(kept[i].mean()) if kept[i].numel() else 0.0
        self._full_bytes += int(report.full_bytes)
        self._compressed_bytes += int(report.compressed_bytes)

    def fresh(self) -> PressRun:
        """The same press, with nothing recorded."""
        return PressRun(self.name, self.options, self.press)

    def merge(self, other: PressRun) -> None:
        """Add what ``other`` recorded."""
        self.add_totals(other.totals())

    def totals(self) -> RunTotals:
        """What was recorded, as plain numbers (to send to another process)."""
        return RunTotals(
            self._sequences, self._context_tokens, self._kept_tokens, self._full_bytes, self._compressed_bytes
        )

    def add_totals(self, totals: RunTotals) -> None:
        """Add what another run recorded (its :meth:`totals`)."""
        self._sequences += totals.sequences
        self._context_tokens += totals.context_tokens
        self._kept_tokens += totals.kept_tokens
        self._full_bytes += totals.full_bytes
        self._compressed_bytes += totals.compressed_bytes

    def reset(self) -> None:
        """Forget the recorded reports."""
        self._sequences = 0
        self._context_tokens = self._kept_tokens = 0.0
        self._full_bytes = self._compressed_bytes = 0

    def statistics(self) -> dict[str, float]:
        """Over the recorded prefills: ``compressed_prompts`` (prompts prefilled under the press),
        ``mean_context_tokens``, ``mean_kept_tokens_per_kv_head`` (kept prompt entries per KV head and
        layer, observation window included, averaged over prompts) and ``kv_fraction`` (KV-cache bytes
        kept after compression over the full cache's, summed over prompts). Empty when nothing was
        recorded (``press=full``, or no request yet)."""
        if not self._sequences:
            return {}
        return {
            "compressed_prompts": self._sequences,
            "mean_context_tokens": self._context_tokens / self._sequences,
            "mean_kept_tokens_per_kv_head": self._kept_tokens / self._sequences,
            "kv_fraction": self._compressed_bytes / self._full_bytes if self._full_bytes else 1.0,
        }

    def info(self) -> dict[str, Any]:
        """The press, its options and :meth:`statistics`, JSON-serialisable (for results files)."""
        return {"press": self.name, "press_options": _jsonable(self.options), **self.statistics()}


def split_press_arguments(
    kwargs: dict[str, Any], model_arguments: Sequence[str] = (), *, strict: bool = True
) -> tuple[PressRun, dict[str, Any]]:
    """Pop the press arguments (``press``, ``budget``, ``compression_ratio`` and the press's own
    options) from a harness model's keyword arguments and build the press (None for ``full``).

    Parameters
    ----------
    kwargs
        The model's keyword arguments (the press's are removed from it).
    model_arguments
        The model's own arguments (named in error messages; never taken for misspelt options).
    strict
        Refuse every argument that is neither the model's nor the press's, before the press is
        built. Otherwise (a model that hands unknown arguments on, as lm-evaluation-harness's
        ``hf`` model does) only options of another press are refused here, and an argument that
        looks like a misspelt option is named when the press cannot be built.

    Returns
    -------
    (PressRun, dict)
        The press with its name and options, and the remaining keyword arguments.

    Raises
    ------
    ValueError
        For an unknown press name or a kvpress one (both listing the names the harnesses accept),
        an unknown argument (listing this press's options), or what
        :func:`mixkv.presses.from_name` refuses.
    """
    name = str(kwargs.pop("press", DEFAULT_PRESS))
    if name in KVPRESS_NAMES:
        raise ValueError(
            f"press={name} is a kvpress press; the harness models take mixkv presses only. "
            f"Choose from: {', '.join(HARNESS_PRESS_NAMES)}."
        )
    if name not in HARNESS_PRESS_NAMES:
        raise ValueError(f"Unknown press {name!r}; choose from: {', '.join(HARNESS_PRESS_NAMES)}.")
    accepted = {"budget", "compression_ratio"} if name == "full" else set(press_options(name))
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in accepted}
    if strict:
        unknown = sorted(k for k in kwargs if k not in model_arguments)
    else:
        unknown = sorted(k for k in kwargs if k in _ALL_PRESS_OPTIONS)
    if unknown:
        raise unknown_arguments_error(name, unknown, model_arguments if strict else ())
    arguments = dict(options)
    budget = arguments.pop("budget", None)
    try:
        press = from_name(name, None if budget is None else int(budget), **arguments)
    except ValueError as exc:
        misspelt = [
            k
            for k in kwargs
            if k not in model_arguments and difflib.get_close_matches(k, press_options(name), 1)
        ]
        if misspelt:
            raise unknown_arguments_error(name, misspelt) from exc
        raise
    return PressRun(name, options, press), kwargs


def unknown_arguments_error(
    press: str, unknown: Iterable[str], model_arguments: Iterable[str] = ()
) -> ValueError:
    """The error for model arguments that neither the model nor press ``press`` takes: it names
    them, lists the press's options (and the model's own arguments when given) and suggests the
    closest valid name."""
    unknown = sorted(unknown)
    options = press_options(press)
    valid = [*options, *model_arguments]
    text = (
        f"Unknown model argument(s) {unknown} for model type mixkv with press={press}. "
        f"{press}'s options: {', '.join(options) if options else 'none'}."
    )
    if model_arguments:
        text += f" The model's own arguments: {', '.join(model_arguments)}."
    hints = [
        f"{name} -> {close[0]}" for name in unknown if (close := difflib.get_close_matches(name, valid, 1))
    ]
    if hints:
        text += f" Did you mean: {', '.join(hints)}?"
    return ValueError(text)


def default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: Any) -> str:
    """The dtype a harness model loads its weights in when none is given: float32 on the CPU
    (bfloat16 matrix products are several times slower there), bfloat16 elsewhere. ``device`` is
    the device or device map the weights go to (``"auto"`` means the GPU when there is one)."""
    if isinstance(device, str) and device == "auto":
        on_cpu = not torch.cuda.is_available()
    elif isinstance(device, (str, torch.device)):
        on_cpu = torch.device(device).type == "cpu"
    elif isinstance(device, dict):  # a per-module device map
        on_cpu = all(str(place).startswith("cpu") for place in device.values())
    else:
        on_cpu = False
    return "float32" if on_cpu else "bfloat16"


@contextlib.contextmanager
def attached(press: BasePress | None, model: torch.nn.Module) -> Iterator[PressSession | None]:
    """``with press(model)``, or nothing for the full cache (``press`` None)."""
    if press is None:
        yield None
    else:
        with press(model) as session:
            yield session


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        try:
            json.dumps(value)
            out[key] = value
        except (TypeError, ValueError):
            out[key] = f"tensor{tuple(value.shape)}" if isinstance(value, torch.Tensor) else str(value)
    return out
