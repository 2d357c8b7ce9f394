"""Argument checks shared by the functional modules."""

from __future__ import annotations

import operator


def as_int(name: str, value: object) -> int:
    """Return ``value`` as a Python int, or raise ``TypeError`` naming the argument."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got the bool {value}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
