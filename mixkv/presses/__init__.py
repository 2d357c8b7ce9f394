"""Presses: small dataclasses that decide which KV entries to keep (``with press(model): ...``)."""

from mixkv.presses.base import BasePress, ScoringContext
from mixkv.presses.budget_policies import AdaKVPress, PyramidKVPress, SnapKVPress, SparseMMPress
from mixkv.presses.decoding import DecodingPress
from mixkv.presses.mixkv import MixKVPress
from mixkv.presses.scorers import KeyDiffPress, KnormPress, RandomPress, StreamingLLMPress

__all__ = [
    "AdaKVPress",
    "BasePress",
    "DecodingPress",
    "KeyDiffPress",
    "KnormPress",
    "MixKVPress",
    "PyramidKVPress",
    "RandomPress",
    "ScoringContext",
    "SnapKVPress",
    "SparseMMPress",
    "StreamingLLMPress",
]
