"""Model integration: cache layers, the attention function and hooks (the only transformers-aware part).

A press attaches to a model through a :class:`PressSession` (``with press(model): ...``):

- ``session``: the session, attaching the press for a ``with`` block and routing each attention call;
- ``attention_functions``: the ``mixkv_sdpa`` / ``mixkv_eager`` functions registered in transformers;
- ``prefill_chunks``: recognising the chunks of ``generate(..., prefill_chunk_size=N)``;
- ``cache_compressor``: when a cache's layers are compressed (prompt, chunks, bounded decoding);
- ``layer_compression``: what one compression keeps, as a new cache layer;
- ``layer_tensors``: the per-layer tensors handed from the attention call to compression;
- ``prefill_report``: the bookkeeping behind the press's ``last_report``;
- ``prompt_recording``: one prompt forward recorded for other presses to compress;
- ``reconstruction``: KVzip's reconstruction forwards (``kvzip_prompt_ids`` builds its repeat prompts);
- ``cache``: the compressed cache layers; ``decoder_layout``: which modules and layers a model has.

Beside them: ``compressed_context`` (compress once, ask many), ``calibration`` (head statistics
measured on a model), ``kvpress_bridge`` (kvpress presses at run time) and ``continuous_batching``
(presses inside transformers' continuous-batching engine, with ``paged_compression`` and
``paged_support``; imported on demand, not from here).
"""

from mixkv.integration.cache import DenseCompressedLayer, PackedCompressedLayer, kv_cache_bytes
from mixkv.integration.chat_prompts import chat_prompt_parts
from mixkv.integration.compressed_context import CompressedContext
from mixkv.integration.decoder_layout import SUPPORTED_MODEL_TYPES, describe_decoder
from mixkv.integration.session import PressSession
from mixkv.presses.compression_report import CompressionReport
from mixkv.presses.kvzip import kvzip_prompt_ids

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
    "kvzip_prompt_ids",
]
