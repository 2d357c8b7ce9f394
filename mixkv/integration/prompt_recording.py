"""A prompt forward recorded under one press, for other presses to compress without a forward.

A press compresses each layer after attending over the whole prompt, so the forward itself (every
layer's queries, keys, values and output) is the same under every press; only what the cache keeps
differs. :meth:`~mixkv.integration.session.PressSession.recording_prompt` records it (the last ``window``
queries and everything each layer held) and
:meth:`~mixkv.integration.session.PressSession.compress_recorded` compresses it under another
press, entry for entry as that press's own forward would. The evaluation uses it to run several
presses over one prompt forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache

from mixkv.integration.decoder_layout import DecoderLayout
from mixkv.integration.layer_tensors import AttentionCall


@dataclass
class RecordedPrompt:
    """One prompt forward through a full-cache layer stack, as a press saw it (see
    :meth:`~mixkv.integration.session.PressSession.recording_prompt`); other presses compress the
    same prompt from it with :meth:`~mixkv.integration.session.PressSession.compress_recorded`,
    without a forward.

    ``calls`` holds, per layer in order, the forward's last ``window`` queries and every key and
    value the layer held; ``query_tokens`` is the number of queries in the forward.
    """

    window: int
    calls: list[AttentionCall] = field(default_factory=list)
    query_tokens: int = 0
    input_ids: torch.Tensor | None = None
    prompt_ids: torch.Tensor | None = None
    #: SnapKV importance per (layer, window size, kernel size, pooling): it depends only on the
    #: recorded queries and keys, so the first press that computes it (recording or compressing)
    #: leaves it here and presses with the same window and pooling reuse it.
    importance: dict[tuple[int, int, int, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def add(
        self, call: AttentionCall, input_ids: torch.Tensor | None, prompt_ids: torch.Tensor | None
    ) -> None:
        """Record one layer's attention call of the prompt forward.

        ``input_ids`` / ``prompt_ids`` are the forward's ids and the declared prompt's, kept from
        the first layer.

        Raises
        ------
        ValueError
            If this layer was already recorded (a second forward in the same block).
        """
        if any(recorded.layer_idx == call.layer_idx for recorded in self.calls):
            raise ValueError("recording_prompt() records one prompt forward; start a new block for another")
        if not self.calls:
            self.input_ids = input_ids
            self.prompt_ids = prompt_ids
            self.query_tokens = call.query.shape[2]
        rotary = (
            None
            if call.rotary is None
            else (call.rotary[0][:, -self.window :].clone(), call.rotary[1][:, -self.window :].clone())
        )
        self.calls.append(
            dataclasses.replace(call, query=call.query[:, :, -self.window :].clone(), rotary=rotary)
        )

    def check_replayable(self, layout: DecoderLayout, window_size: int, model_name: str) -> None:
        """Refuse to compress this recording under a press of ``window_size`` on ``layout``.

        Raises
        ------
        ValueError
            If the recording holds no complete forward, the model has sliding-window layers, or
            ``window_size`` is larger than the recorded window of a longer forward.
        """
        if len(layout.compressible_layers) != layout.num_layers:
            raise ValueError(
                f"{model_name} has sliding-window layers; replaying a recorded prompt supports "
                "models whose every layer is a full dynamic layer"
            )
        if [call.layer_idx for call in self.calls] != list(range(layout.num_layers)):
            raise ValueError(
                "recorded holds no complete prompt forward: run one forward inside recording_prompt() first"
            )
        if self.query_tokens > self.window and window_size > self.window:
            raise ValueError(
                f"this press's window_size ({window_size}) is larger than the {self.window} "
                "queries recorded; record with recording_prompt(window=...) at least as large"
            )

    def full_cache(self) -> Cache:
        """A new dynamic cache holding every key and value of the recorded prompt: the full cache
        the recorded forward would have left without a press."""
        cache = DynamicCache()
        for call in self.calls:
            cache.update(call.keys, call.values, call.layer_idx)
        return cache
