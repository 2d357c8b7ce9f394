"""Method names of the evaluation grids: which exist, how a name splits into a press and its mode.

A method is a press registry name (:mod:`mixkv.presses.registry`), ``full`` (the full cache) or,
in the text grid only, :data:`CLOSED_BOOK`. A mixkv press's name may carry ``+chunkN`` /
``+decodeN`` (see :class:`MethodVariant`). The grids (:mod:`mixkv.eval.runner`,
:mod:`mixkv.eval.mm_runner`), the fidelity measurement and the commands all check names here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mixkv.eval.stats_tables import UNBUDGETED_METHODS
from mixkv.presses.decoding import DecodingPress
from mixkv.presses.registry import (
    KVPRESS_MASKING_NAMES,
    KVPRESS_NAMES,
    NAMES,
    build_press,
    is_method_name,
    kvpress_available,
    press_entry,
    split_scorer_name,
)

__all__ = [
    "CLOSED_BOOK",
    "KVPRESS_METHODS",
    "METHODS",
    "MethodVariant",
    "as_list",
    "check_compare",
    "check_methods",
    "parse_method",
    "reconstructs_the_prompt",
    "scores_a_whole_forward",
]

#: Methods backed by NVIDIA's ``kvpress`` package (only when it is importable).
KVPRESS_METHODS: tuple[str, ...] = KVPRESS_NAMES

#: The text grid's method that asks each question without its context (no press, nothing to compress).
CLOSED_BOOK = "closed-book"

#: Every method name the text grid accepts: the press registry's names and :data:`CLOSED_BOOK`.
METHODS: tuple[str, ...] = (*NAMES, CLOSED_BOOK)


def scores_a_whole_forward(method: str) -> bool:
    """Whether the method's press scores from the whole prompt's own forward, so it prefills the
    whole prompt itself (no shared prefix, no recorded prompt, no chunks): a kvpress scorer run by
    mixkv (``<method>@kvpress-<scorer>``, from the attention modules' inputs)."""
    return "@" in method and split_scorer_name(method) is not None


def reconstructs_the_prompt(method: str) -> bool:
    """Whether the method's press scores from forwards that repeat the whole prompt after it
    (KVzip, in either layout): it continues a shared prefix (declaring the whole prompt), but cannot
    compress another press's recorded forward, so it decodes on its own, and takes no chunks."""
    if method not in NAMES:
        return False
    press_class = press_entry(method).press_class
    return press_class is not None and press_class.needs_reconstruction


def as_list(name: str, values: Sequence[Any] | Any) -> list[Any]:
    """``values`` as a list (a lone string or int becomes one item); ValueError when empty."""
    if isinstance(values, (str, int)):
        values = [values]
    out = list(values)
    if not out:
        raise ValueError(f"{name} must not be empty.")
    return out


@dataclass(frozen=True)
class MethodVariant:
    """A grid method name split into its press and how the press runs.

    A text grid's method is a registry name, optionally followed by ``+chunkN`` (the prompt is
    prefilled in chunks of ``N`` tokens and compressed as it goes, see
    :meth:`~mixkv.integration.session.PressSession.chunked_prefill`) and/or ``+decodeN`` (the
    press is wrapped in :class:`~mixkv.DecodingPress` with ``interval=N``, so the cache is cut
    back to the budget every ``N`` tokens fed after the prompt), e.g.
    ``"mixkv-snapkv+chunk512+decode16"``. Such variants run on the same examples as their
    plain method, so ``compare=[("mixkv-snapkv", "mixkv-snapkv+chunk512")]`` measures what the
    mode costs, paired. A chunked variant prefills every example from position 0 (it shares no
    prefix).
    """

    press_method: str
    prefill_chunk_size: int | None = None
    decoding_interval: int | None = None

    def press(
        self, budget: int | None, *, context_tokens: int, window_size: int = 32, tokenizer: Any = None
    ) -> Any:
        """:func:`~mixkv.presses.registry.build_press` of ``press_method`` (``tokenizer`` gives KVzip
        its repeat prompts), inside a :class:`~mixkv.DecodingPress` when the variant has a decoding
        interval."""
        if self.press_method == CLOSED_BOOK:
            return None
        press = build_press(
            self.press_method,
            budget,
            context_tokens=context_tokens,
            window_size=window_size,
            tokenizer=tokenizer,
        )
        if self.decoding_interval is None:
            return press
        return DecodingPress(press, interval=self.decoding_interval)

    @property
    def continues_a_prefix(self) -> bool:
        """Whether the method prefills only the tail of an example, under its press, from a copy of
        the shared full-cache prefix (kvpress presses replay instead, see
        :attr:`replays_a_prefill`; chunked prefills start from position 0)."""
        return (
            self.press_method not in (CLOSED_BOOK, *KVPRESS_METHODS)
            and self.prefill_chunk_size is None
            and not scores_a_whole_forward(self.press_method)
        )

    @property
    def decodes_together(self) -> bool:
        """Whether the method's answers can be decoded in one batch with other such methods'
        (:func:`~mixkv.eval.text_example_run.run_examples_together`, in the session of a mixkv press among
        them): the full cache, mixkv presses that do not compress while decoding, and kvpress
        presses that leave a plain shortened cache (not those that mask keys while decoding, nor
        ``closed-book``, whose prompt is another, nor kvpress scorers run by mixkv, which prefill on
        their own: :func:`scores_a_whole_forward`, nor KVzip: :func:`reconstructs_the_prompt`)."""
        return (
            self.press_method not in (CLOSED_BOOK, *KVPRESS_MASKING_NAMES)
            and self.decoding_interval is None
            and not scores_a_whole_forward(self.press_method)
            and not reconstructs_the_prompt(self.press_method)
        )

    @property
    def is_mixkv_press(self) -> bool:
        """Whether the method is a press of this library (not the full cache, not kvpress)."""
        return self.press_method not in (*UNBUDGETED_METHODS, *KVPRESS_METHODS)

    @property
    def replays_a_prefill(self) -> bool:
        """Whether the method is a kvpress press, run by replaying its hooks on an example's
        recorded full-cache prefill (:mod:`mixkv.eval.replay`) instead of a prefill of its own."""
        return self.press_method in KVPRESS_METHODS


#: ``+<modifier>N`` of a method name -> the :class:`MethodVariant` field it sets.
_MODIFIERS = {"chunk": "prefill_chunk_size", "decode": "decoding_interval"}


def parse_method(name: str) -> MethodVariant:
    """Split ``"<method>[+chunkN][+decodeN]"`` (see :class:`MethodVariant`); ValueError for an
    unknown method or modifier, or a modifier on ``full`` or a kvpress method."""
    press_method, *modifiers = name.strip().lower().split("+")
    if press_method not in METHODS and not is_method_name(press_method):
        raise ValueError(f"Unknown method {press_method!r}; choose from: {', '.join(METHODS)}.")
    if modifiers and (scores_a_whole_forward(press_method) or reconstructs_the_prompt(press_method)):
        raise ValueError(
            f"Method {name!r}: this press scores the whole prompt in one forward (a kvpress scorer) or "
            "from forwards that repeat it (KVzip), so it takes no +chunk / +decode modifier."
        )
    found: dict[str, int] = {}
    for modifier in modifiers:
        kind = modifier.rstrip("0123456789")
        size = modifier[len(kind) :]
        if kind not in _MODIFIERS or not size or int(size) < 1 or _MODIFIERS[kind] in found:
            raise ValueError(
                f"Method {name!r}: modifiers are +chunkN (prefill in chunks of N tokens) and +decodeN "
                "(re-compress every N tokens after the prompt), each at most once with N >= 1, e.g. "
                "mixkv-snapkv+chunk512."
            )
        found[_MODIFIERS[kind]] = int(size)
    if found and (press_method in UNBUDGETED_METHODS or press_method in KVPRESS_METHODS):
        raise ValueError(
            f"Method {name!r}: +chunk / +decode apply to mixkv presses, not to {press_method!r}."
        )
    return MethodVariant(press_method, **found)


def check_methods(
    methods: Sequence[str] | str, *, variants: bool = False, closed_book: bool = False
) -> list[str]:
    """Normalised method names; ValueError for unknown ones or kvpress methods without kvpress.

    With ``variants`` a name may carry ``+chunkN`` / ``+decodeN`` (:func:`parse_method`); with
    ``closed_book`` (the text grid) :data:`CLOSED_BOOK` is accepted; otherwise those are refused."""
    out = [m.strip().lower() for m in as_list("methods", methods)]
    known = METHODS if closed_book else NAMES
    unknown = [m for m in out if m.split("+")[0] not in known and not _scorer_name(m.split("+")[0])]
    if any(m.split("+")[0] == CLOSED_BOOK for m in unknown):
        raise ValueError(
            f"{CLOSED_BOOK!r} (the question without its context) is a method of the text task grid "
            "(`mixkv eval` on text tasks) only; drop it here."
        )
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from: {', '.join(known)}.")
    for m in (m for m in out if "+" in m):
        if not variants:
            raise ValueError(
                f"Method {m!r}: +chunk / +decode variants are supported by the text grid only; "
                "drop the modifier."
            )
        parse_method(m)
    wanted_kvpress = [m for m in out if m in KVPRESS_METHODS]
    if wanted_kvpress and not kvpress_available():
        raise ValueError(
            f"Method(s) {wanted_kvpress} need NVIDIA's kvpress, which is not importable; "
            "`pip install kvpress` or drop them."
        )
    return out


def _scorer_name(method: str) -> bool:
    """Whether ``method`` is a ``<method>@kvpress-<scorer>`` name; ValueError (saying why) for one
    that cannot be (kvpress missing, not a scorer...)."""
    if not scores_a_whole_forward(method):
        return False
    press_entry(method)
    return True


def check_compare(compare: Sequence[tuple[str, str]], methods: Sequence[str]) -> list[tuple[str, str]]:
    """Normalised ``(A, B)`` method pairs; ValueError unless both are distinct methods of the run."""
    out: list[tuple[str, str]] = []
    for pair in compare:
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(
                f"compare takes (A, B) method pairs, e.g. [('snapkv', 'keydiff')]; got {pair!r}."
            )
        a, b = (str(m).strip().lower() for m in pair)
        missing = [m for m in (a, b) if m not in methods]
        if missing:
            raise ValueError(
                f"compare pair {a}:{b} names {missing}, not among the methods run ({', '.join(methods)}); "
                "add them to the methods or drop the pair."
            )
        if a == b:
            raise ValueError(f"compare pair {a}:{b} compares a method with itself; name two methods.")
        out.append((a, b))
    return out
