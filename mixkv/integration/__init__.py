"""Model integration: cache layers, the attention function and hooks (the only transformers-aware part)."""

from mixkv.integration.cache import DenseCompressedLayer, PackedCompressedLayer, kv_cache_bytes
from mixkv.integration.chat_prompts import chat_prompt_parts
from mixkv.integration.compressed_context import CompressedContext
from mixkv.integration.compression_report import CompressionReport
from mixkv.integration.decoder_layout import SUPPORTED_MODEL_TYPES, describe_decoder
from mixkv.integration.session import PressSession

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CompressedContext",
    "CompressionReport",
    "DenseCompressedLayer",
    "PackedCompressedLayer",
    "PressSession",
    "chat_prompt_parts",
    "describe_decoder",
    "kv_cache_bytes",
]
