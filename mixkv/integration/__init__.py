"""Model integration: cache layers, the attention function and hooks (the only transformers-aware part)."""

from mixkv.integration.cache import DenseCompressedLayer, PackedCompressedLayer, kv_cache_bytes
from mixkv.integration.models import SUPPORTED_MODEL_TYPES, describe_decoder
from mixkv.integration.report import CompressionReport
from mixkv.integration.session import PressSession

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CompressionReport",
    "DenseCompressedLayer",
    "PackedCompressedLayer",
    "PressSession",
    "describe_decoder",
    "kv_cache_bytes",
]
