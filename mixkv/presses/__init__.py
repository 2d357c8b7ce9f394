"""Presses: small dataclasses that decide which KV entries to keep (``with press(model): ...``)."""

from mixkv.presses.attention_scorers import (
    ExpectedAttentionPress,
    MixKVExpectedAttentionPress,
    MixKVTOVAPress,
    TOVAPress,
)
from mixkv.presses.base import BasePress, ScoringContext
from mixkv.presses.budget_policies import AdaKVPress, PyramidKVPress, SnapKVPress, SparseMMPress
from mixkv.presses.compression_report import CompressionReport
from mixkv.presses.decoding import DecodingPress
from mixkv.presses.kvpress_scorers import KvpressScorerPress
from mixkv.presses.kvzip import KVzipPress, MixKVKVzipPress, kvzip_prompt_ids
from mixkv.presses.mixkv import MixKVPress
from mixkv.presses.multimodal import LookMPress, VLCachePress
from mixkv.presses.registry import NAMES, PressEntry, from_name, list_presses
from mixkv.presses.scorers import KeyDiffPress, KnormPress, RandomPress, StreamingLLMPress

__all__ = [
    "NAMES",
    "AdaKVPress",
    "BasePress",
    "CompressionReport",
    "DecodingPress",
    "ExpectedAttentionPress",
    "KVzipPress",
    "KeyDiffPress",
    "KnormPress",
    "KvpressScorerPress",
    "LookMPress",
    "MixKVExpectedAttentionPress",
    "MixKVKVzipPress",
    "MixKVPress",
    "MixKVTOVAPress",
    "PressEntry",
    "PyramidKVPress",
    "RandomPress",
    "ScoringContext",
    "SnapKVPress",
    "SparseMMPress",
    "StreamingLLMPress",
    "TOVAPress",
    "VLCachePress",
    "from_name",
    "kvzip_prompt_ids",
    "list_presses",
]
