"""What presses inside transformers' continuous batching accept: the engine, the model, the press.

Every refusal names what is refused and why; :mod:`~mixkv.integration.continuous_batching` calls
these checks when a manager is built and when a request is added.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from packaging.version import Version

from mixkv.functional import pyramid_budgets
from mixkv.integration.decoder_layout import DecoderLayout, describe_decoder
from mixkv.integration.tensor_parallel import refuse_tensor_parallel
from mixkv.presses.attention_scorers import ExpectedAttentionPress
from mixkv.presses.base import BasePress
from mixkv.presses.budget_policies import AdaKVPress, PyramidKVPress, SparseMMPress
from mixkv.presses.decoding import DecodingPress
from mixkv.presses.mixkv import MixKVPress

#: The transformers release the continuous-batching integration was written against.
WRITTEN_AGAINST = "5.25"

#: Press classes whose budget is the same for every layer and KV head (the registry names).
UNIFORM_PRESSES = (
    "snapkv",
    "mixkv-snapkv",
    "keydiff",
    "knorm",
    "streamingllm",
    "random",
    "tova",
    "mixkv-tova",
    "lookm",
)
#: Press classes with one budget per layer, supported by masking each layer's unused slots.
PER_LAYER_PRESSES = ("pyramidkv", "mixkv-pyramidkv")

_PER_HEAD = (
    "it gives each KV head its own budget, but a paged cache slot holds every KV head of a layer and "
    "the paged attention mask is shared by all heads"
)
_USE_INSTEAD = (
    f"use a press with a uniform budget ({', '.join(UNIFORM_PRESSES)}) or per-layer budgets "
    f"({', '.join(PER_LAYER_PRESSES)})"
)


def engine_unavailable_reason() -> str | None:
    """Why transformers' continuous-batching internals this integration uses are missing, or None."""
    installed = Version(transformers.__version__)
    if installed < Version(WRITTEN_AGAINST):
        return (
            f"mixkv presses in continuous batching need transformers >= {WRITTEN_AGAINST} (its paged cache "
            f"allocators, request states and batch processor); transformers {transformers.__version__} is installed"
        )
    try:
        from transformers.generation.continuous_batching.cache_allocators.full_attention import (  # noqa: F401
            FullAttentionCacheAllocator,
        )
        from transformers.generation.continuous_batching.continuous_api import (  # noqa: F401
            ContinuousBatchingManager,
        )
    except ImportError as error:
        return (
            f"transformers {transformers.__version__} lacks the continuous-batching internals mixkv uses "
            f"(written against {WRITTEN_AGAINST}): {error}"
        )
    return None


def press_name(press: Any) -> str:
    """The registry name of a mixkv press (``"mixkv-adakv"``), else its class name."""
    if isinstance(press, MixKVPress):
        return f"mixkv-{press.base}"
    if isinstance(press, BasePress):
        name = type(press).__name__
        if not type(press).__module__.startswith("mixkv."):
            return name
        short = name.removesuffix("Press").lower()
        return short.replace("mixkv", "mixkv-", 1) if short.startswith("mixkv") else short
    return type(press).__name__


def per_layer_budgets(press: Any) -> bool:
    """PyramidKV or MixKV on PyramidKV: one budget per layer, the same for every KV head."""
    if isinstance(press, MixKVPress):
        return press.base == "pyramidkv"
    return type(press) is PyramidKVPress


def most_kept(press: BasePress, prompt: int, num_layers: int) -> int:
    """The most entries any layer of a request keeps of a ``prompt``-token prompt (its cache length
    after the prompt's compression)."""
    budget = press.sequence_budget(prompt)
    if prompt <= budget:
        return prompt
    if per_layer_budgets(press):
        beta = press.beta  # type: ignore[attr-defined]
        return int(pyramid_budgets(num_layers, budget, press.window_size, prompt, beta=beta).max())
    return budget


def check_press(press: Any) -> None:
    """Refuse, by name and with the reason, a press that continuous batching cannot apply exactly.

    Raises
    ------
    ValueError
        For per-head budgets (AdaKV, SparseMM and MixKV on them), ExpectedAttention (and MixKV on
        it), KVzip (its reconstruction forwards), kvpress presses, a press
        overriding ``head_budgets`` (other than PyramidKV's), or a :class:`~mixkv.DecodingPress`
        around a refused press or around per-layer budgets (PyramidKV, MixKV-PyramidKV).
    """
    if isinstance(press, DecodingPress):
        try:
            check_press(press.press)
        except ValueError as error:
            raise ValueError(f"DecodingPress({press_name(press.press)}): {error}") from None
        if per_layer_budgets(press.press):
            raise ValueError(
                f"DecodingPress({press_name(press.press)}) is not supported in continuous batching: per-layer "
                "budgets make each layer reach its decoding bound at its own step, but a request's paged "
                "cache has one length for every layer; use DecodingPress around a press with a uniform "
                f"budget ({', '.join(UNIFORM_PRESSES)})"
            )
        return
    if not isinstance(press, BasePress):
        origin = type(press).__module__.split(".")[0]
        what = "kvpress presses" if origin == "kvpress" else f"{type(press).__name__} objects"
        raise ValueError(
            f"{what} are not supported in continuous batching ({type(press).__name__}): only mixkv presses are, "
            "scored through mixkv's ScoringContext at the end of each request's prefill; "
            "use the mixkv press of the same method (e.g. mixkv.SnapKVPress)"
        )
    name = press_name(press)
    if isinstance(press, ExpectedAttentionPress):
        raise ValueError(
            f"{name} is not supported in continuous batching: it needs each layer's rotary tables, which the "
            f"paged attention path does not pass on; {_USE_INSTEAD}"
        )
    if press.needs_reconstruction:
        raise ValueError(
            f"{name} is not supported in continuous batching: it scores each prompt with reconstruction "
            f"forwards after its prefill, which the batching engine does not run; {_USE_INSTEAD}"
        )
    if per_layer_budgets(press):
        return
    if isinstance(press, MixKVPress) and press.base == "vlcache":
        raise ValueError(
            f"{name} is not supported in continuous batching: VL-Cache's budgets differ between layers with "
            f"each prompt's attention sparsity, which the paged cache's per-layer slots are not planned for; "
            f"{_USE_INSTEAD}"
        )
    if isinstance(press, MixKVPress) and press.base != "snapkv":
        raise ValueError(f"{name} is not supported in continuous batching: {_PER_HEAD}; {_USE_INSTEAD}")
    if isinstance(press, (AdaKVPress, SparseMMPress)):
        raise ValueError(f"{name} is not supported in continuous batching: {_PER_HEAD}; {_USE_INSTEAD}")
    if not isinstance(press, MixKVPress) and type(press).head_budgets is not BasePress.head_budgets:
        raise ValueError(
            f"{name} overrides head_budgets(), so its budgets may differ between layers or KV heads, which a "
            f"paged cache cannot hold; {_USE_INSTEAD}"
        )


def check_model(model: torch.nn.Module) -> DecoderLayout:
    """The decoder of a model whose paged cache a press can compress, or a refusal saying why.

    Raises
    ------
    ValueError
        For a model family or attention implementation mixkv does not support (only ``sdpa`` and
        ``eager``), sliding-window or chunked-attention layers (e.g. Gemma 3), or latent (MLA)
        attention, or a tensor-parallel model.
    """
    refuse_tensor_parallel(
        model,
        "continuous batching with a press",
        "the paged compression was written for a paged cache holding every KV head of a layer",
    )
    layout = describe_decoder(model)
    from transformers.generation.continuous_batching.cache import group_layers_by_attn_type

    groups = group_layers_by_attn_type(layout.text_config)
    other = sorted(set(groups) - {"full_attention"})
    if other:
        raise ValueError(
            f"{type(model).__name__} has {', '.join(other)} layers: continuous batching with a press supports "
            "full-attention models only (a sliding-window group's ring slots follow token positions, which "
            "compression shifts); use the model without a press, or a full-attention model"
        )
    if getattr(layout.text_config, "kv_lora_rank", None) is not None:
        raise ValueError(
            f"{type(model).__name__} uses latent (MLA) attention, whose paged cache mixkv cannot compress"
        )
    return layout
