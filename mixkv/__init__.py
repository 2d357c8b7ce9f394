"""mixkv: MixKV and friends, real KV-cache compression for transformers LLMs and VLMs.

Usage::

    from mixkv import MixKVPress
    with MixKVPress(budget=128, base="adakv")(model):
        model.generate(**inputs, max_new_tokens=64)
"""

from mixkv.integration import CompressedContext, PressSession, kv_cache_bytes
from mixkv.presses import (
    AdaKVPress,
    BasePress,
    CompressionReport,
    DecodingPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    KVzipPress,
    LookMPress,
    MixKVExpectedAttentionPress,
    MixKVKVzipPress,
    MixKVPress,
    MixKVTOVAPress,
    PyramidKVPress,
    RandomPress,
    ScoringContext,
    SnapKVPress,
    SparseMMPress,
    StreamingLLMPress,
    TOVAPress,
    VLCachePress,
)

__version__ = "0.1.0"


__all__ = [
    "AdaKVPress",
    "BasePress",
    "CompressedContext",
    "CompressionReport",
    "DecodingPress",
    "ExpectedAttentionPress",
    "KVzipPress",
    "KeyDiffPress",
    "KnormPress",
    "LookMPress",
    "MixKVExpectedAttentionPress",
    "MixKVKVzipPress",
    "MixKVPress",
    "MixKVTOVAPress",
    "PressSession",
    "PyramidKVPress",
    "RandomPress",
    "ScoringContext",
    "SnapKVPress",
    "SparseMMPress",
    "StreamingLLMPress",
    "TOVAPress",
    "VLCachePress",
    "kv_cache_bytes",
]
