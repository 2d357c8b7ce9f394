"""Parsing helpers shared by the ``mixkv`` commands."""

from __future__ import annotations


def split_list(text: str) -> list[str]:
    """The non-empty items of a comma-separated list (``"a, b,"`` -> ``["a", "b"]``)."""
    return [part.strip() for part in text.split(",") if part.strip()]
