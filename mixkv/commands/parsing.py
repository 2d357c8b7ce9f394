"""Parsing helpers shared by the ``mixkv`` commands: comma-separated lists, integers, method pairs,
devices."""

from __future__ import annotations

from collections.abc import Sequence


def split_list(values: str | Sequence[str] | None) -> list[str]:
    """The non-empty items of comma-separated lists: ``"a, b,"`` or ``["a,b", "c"]`` (``--x a,b c``)."""
    if values is None:
        return []
    texts = [values] if isinstance(values, str) else values
    return [part.strip() for text in texts for part in text.split(",") if part.strip()]


def int_list(values: str | Sequence[str] | None, flag: str) -> list[int]:
    """The integers of :func:`split_list`'s items; ``ValueError`` naming ``flag`` for anything else."""
    try:
        return [int(item) for item in split_list(values)]
    except ValueError as exc:
        raise ValueError(f"{flag} takes integers (e.g. {flag} 64,128), got {values!r}") from exc


def method_pairs(values: str | Sequence[str] | None) -> list[tuple[str, str]]:
    """``A:B`` method pairs (``--compare snapkv:keydiff``)."""
    pairs: list[tuple[str, str]] = []
    for value in split_list(values):
        a, sep, b = value.partition(":")
        if not sep or not a.strip() or not b.strip() or ":" in b:
            raise ValueError(
                f"--compare takes METHOD:METHOD pairs (e.g. --compare snapkv:keydiff), got {value!r}."
            )
        pairs.append((a.strip(), b.strip()))
    return pairs


def checked_device(name: str) -> str:
    """A ``--device`` value, refused with what to change when torch cannot run there (not a device
    name, or ``cuda`` on a machine whose torch sees no GPU)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a torch device ({exc}); e.g. cpu or cuda.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu.")
    return name
