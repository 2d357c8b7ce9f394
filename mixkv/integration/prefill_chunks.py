"""Recognising the forwards of ``generate(..., prefill_chunk_size=N)`` as chunks of one prompt.

Under a press, a prompt that arrives in chunks is compressed at the end of every chunk and a later
forward through the same cache (a question, decoded tokens) is appended. ``generate``'s chunk loop
(``GenerationMixin._prefill`` in transformers 5.x) gives the model nothing that tells a chunk from
such a later forward: each chunk is a plain multi-token forward through the cache, with the
attention mask sliced to the tokens so far, and ``is_first_iteration`` stays in
``prepare_inputs_for_generation``. Nor can the model know which chunk is the last. So the session
reads the caller's frame: the loop's ``input_chunks`` and ``chunk_idx``. That ties this module to
transformers' private loop; ``tests/test_prefill_chunks.py`` fails when the loop changes.
(``PressSession.chunked_prefill()`` is the supported way to prefill in chunks by hand.)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import FrameType

from transformers.generation.utils import GenerationMixin

# Frames between the model's forward pre-hook that asks and ``_prefill`` (torch's module call
# wrappers, the hook itself), with room to spare.
_GENERATE_FRAME_DEPTH = 8


@dataclass(frozen=True)
class PrefillChunk:
    """The current forward is one chunk of a prompt; ``closes_prompt`` when it is the last."""

    closes_prompt: bool


def generate_prefill_chunk() -> PrefillChunk | None:
    """The chunk ``generate(..., prefill_chunk_size=N)`` is prefilling, or None.

    Call it from a forward pre-hook of the model: it looks up the caller's frames for
    ``GenerationMixin._prefill`` running its chunk loop over at least two chunks (a prompt that
    fits one chunk is a plain prefill).
    """
    prefill_code = getattr(getattr(GenerationMixin, "_prefill", None), "__code__", None)
    frame: FrameType | None = sys._getframe(1)
    for _ in range(_GENERATE_FRAME_DEPTH):
        if frame is None:
            return None
        if frame.f_code is prefill_code:
            chunks, index = frame.f_locals.get("input_chunks"), frame.f_locals.get("chunk_idx")
            if not isinstance(chunks, (tuple, list)) or not isinstance(index, int) or len(chunks) < 2:
                return None
            return PrefillChunk(closes_prompt=index == len(chunks) - 1)
        frame = frame.f_back
    return None
