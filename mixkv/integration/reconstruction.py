"""KVzip's reconstruction forwards: the model repeats the prompt, and its attention scores the cache.

After a prompt's prefill under a press with ``needs_reconstruction``, the session runs the press's
repeat chunks (:meth:`~mixkv.presses.kvzip.KVzipPress.repeat_chunks`) through the model with the
prompt's cache. :class:`Reconstruction` is what the session's hooks do meanwhile: before each layer's
attention module it remembers what the cache layer holds; in the attention function it scores the
layer's context entries with the repeat's queries
(:func:`~mixkv.functional.reconstruction_attention`) and puts the layer back as it was, so the
repeat's tokens never stay in the cache (one layer at a time holds them).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from mixkv.functional import reconstruction_attention
from mixkv.presses.kvzip import RepeatChunk


class Reconstruction:
    """The running reconstruction of one prompt of ``context_length`` cached entries.

    Attributes
    ----------
    scores : dict[int, Tensor]
        Layer -> ``(B, Hkv, context_length)`` KVzip scores so far (max over the chunks' queries).
    """

    def __init__(self, cache: Cache, context_length: int, n_sink: int, compressible: tuple[int, ...]) -> None:
        self.cache = cache
        self.context_length = context_length
        self.n_sink = n_sink
        self.compressible = compressible
        self.chunk: RepeatChunk | None = None
        self.scores: dict[int, torch.Tensor] = {}
        self._saved: dict[int, dict[str, Any]] = {}

    def remember(self, layer_idx: int) -> None:
        """Before the layer's attention module runs: what its cache layer holds (the tensors are
        replaced, not written in place, by a dynamic layer's update)."""
        if layer_idx < len(self.cache.layers):
            self._saved[layer_idx] = dict(vars(self.cache.layers[layer_idx]))

    def score(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """In the layer's attention: score the chunk's context entries, then restore the layer."""
        try:
            chunk = self.chunk
            if chunk is not None and layer_idx in self.compressible:
                n = self.context_length
                if key.shape[2] != n + query.shape[2]:
                    raise ValueError(
                        f"layer {layer_idx} holds {key.shape[2] - query.shape[2]} entries before the repeat "
                        f"prompt, not the prompt's {n}: KVzipPress needs a plain dynamic cache layer"
                    )
                chunk_scores = reconstruction_attention(
                    query,
                    key[:, :, :n],
                    key[:, :, n:],
                    start=chunk.start,
                    end=chunk.end,
                    n_sink=self.n_sink,
                    scaling=scaling,
                )
                held = self.scores.get(layer_idx)
                if held is None:
                    held = self.scores[layer_idx] = torch.zeros(
                        (*chunk_scores.shape[:2], n), dtype=torch.float32, device=chunk_scores.device
                    )
                view = held[..., chunk.start : chunk.end]
                torch.maximum(view, chunk_scores, out=view)
        finally:
            self.restore(layer_idx)

    def restore(self, layer_idx: int | None = None) -> None:
        """Put one layer (or every remembered layer) back as it was before the repeat."""
        indices = list(self._saved) if layer_idx is None else [layer_idx]
        for index in indices:
            saved = self._saved.pop(index, None)
            if saved is not None:
                layer = self.cache.layers[index]
                vars(layer).clear()
                vars(layer).update(saved)
