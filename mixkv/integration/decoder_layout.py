"""Which models mixkv supports, and where their decoder attention modules are."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

# Top-level `config.model_type` of every family proven by the test-suite (tests/families.py).
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi-3",
    "gemma3_text": "Gemma 3 (text)",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "llava": "LLaVA",
    "llava_next": "LLaVA-NeXT",
    "llava_next_video": "LLaVA-NeXT-Video",
    "llava_onevision": "LLaVA-OneVision",
    "internvl": "InternVL",
    "idefics3": "Idefics3",
    "smolvlm": "SmolVLM",
    "gemma3": "Gemma 3",
}
SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class DecoderLayout:
    """The text decoder of a model, as a press needs it.

    Attributes
    ----------
    text_config : PretrainedConfig
        Config object shared by the decoder's attention modules.
    attention_modules : list[torch.nn.Module]
        One self-attention module per decoder layer, indexed by ``layer_idx``.
    num_heads, num_kv_heads, head_dim : int
    image_token_id : int or None
        Placeholder id of image tokens in ``input_ids`` (None for text-only models).
    video_token_id : int or None
        Placeholder id of video tokens in ``input_ids`` (None where the model has none). InternVL
        and SmolVLM have none: their processors expand video frames into image placeholders.
    compressible_layers : tuple[int, ...]
        Full-attention layers. Sliding-window (and chunked) layers are never compressed: their cache
        is already bounded by the window, and their decode-time mask depends on the window.
    """

    text_config: PretrainedConfig
    attention_modules: list[torch.nn.Module]
    num_heads: int
    num_kv_heads: int
    image_token_id: int | None
    video_token_id: int | None
    compressible_layers: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.attention_modules)

    def visual_token_masks(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(is_image, is_video)`` boolean masks shaped like ``input_ids``, or None for a model
        without visual placeholders."""
        if self.image_token_id is None and self.video_token_id is None:
            return None

        def is_token(token_id: int | None) -> torch.Tensor:
            return (
                input_ids == token_id
                if token_id is not None
                else torch.zeros_like(input_ids, dtype=torch.bool)
            )

        return is_token(self.image_token_id), is_token(self.video_token_id)


def _layer_types(text_config: PretrainedConfig) -> list[str]:
    """Attention type of every decoder layer, as transformers' DynamicCache decides it."""
    try:  # transformers >= 5.5 (per-layer configs, KV sharing)
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:
        explicit = getattr(text_config, "layer_types", None)
        if explicit is not None:
            return list(explicit)
        sliding = getattr(text_config, "sliding_window", None) is not None
        return ["sliding_attention" if sliding else "full_attention"] * text_config.num_hidden_layers
    return list(get_layer_types_and_kwargs(text_config)[0])


def placeholder_token_id(config: PretrainedConfig, modality: str) -> int | None:
    """``config.<modality>_token_id`` (or the older ``..._token_index``) when it is an int."""
    for name in (f"{modality}_token_id", f"{modality}_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def describe_decoder(model: torch.nn.Module) -> DecoderLayout:
    """Validate ``model`` and locate its decoder attention modules.

    Raises
    ------
    ValueError
        For a model family or attention implementation mixkv does not support, named.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"expected a transformers model with a config, got {type(model).__name__}")
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise ValueError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported by mixkv; supported: {supported}"
        )
    text_config = config.get_text_config(decoder=True)
    implementation = text_config._attn_implementation
    if str(implementation).startswith("mixkv_"):
        raise ValueError(
            "another mixkv press is already attached to this model; nesting presses is not supported"
        )
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported by mixkv presses; load the model with "
            "attn_implementation='sdpa' or 'eager' (or call model.set_attn_implementation('sdpa'))"
        )
    by_layer: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if (
            isinstance(layer_idx, int)
            and getattr(module, "config", None) is text_config
            and type(module).__name__.endswith("Attention")
        ):
            by_layer[layer_idx] = module
    num_layers = text_config.num_hidden_layers
    if sorted(by_layer) != list(range(num_layers)):
        raise ValueError(
            f"could not locate one self-attention module per decoder layer in {type(model).__name__} "
            f"(found layers {sorted(by_layer)} of {num_layers}); this model layout is not supported"
        )
    layer_types = _layer_types(text_config)
    compressible = tuple(i for i, kind in enumerate(layer_types) if kind == "full_attention")
    if not compressible:
        raise ValueError(
            f"every decoder layer of {type(model).__name__} uses {layer_types[0]!r}: there is no full-attention "
            "layer whose cache mixkv could compress"
        )
    num_heads = text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    return DecoderLayout(
        text_config=text_config,
        attention_modules=[by_layer[i] for i in range(num_layers)],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        image_token_id=placeholder_token_id(config, "image"),
        video_token_id=placeholder_token_id(config, "video"),
        compressible_layers=compressible,
    )


def rope_inverse_frequencies(model: torch.nn.Module, layout: DecoderLayout) -> dict[int, torch.Tensor]:
    """Inverse frequencies of the rotary embedding of each compressible layer (empty without one).

    Read off the text decoder's rotary module (the one whose class name ends in
    ``RotaryEmbedding`` and is not a vision tower's): its ``inv_freq``, or, for models with one
    rotary embedding per layer type (Gemma 3), its ``<layer type>_inv_freq``.
    """
    rotary = next(
        (
            module
            for module in model.modules()
            if type(module).__name__.endswith("RotaryEmbedding") and "Vision" not in type(module).__name__
        ),
        None,
    )
    if rotary is None:
        return {}
    layer_types = _layer_types(layout.text_config)
    out: dict[int, torch.Tensor] = {}
    for layer_idx in layout.compressible_layers:
        inv_freq = getattr(rotary, f"{layer_types[layer_idx]}_inv_freq", getattr(rotary, "inv_freq", None))
        if isinstance(inv_freq, torch.Tensor):
            out[layer_idx] = inv_freq.detach().float()
    return out


def rotary_tables(position_embeddings: Any, config: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(cos, sin)`` tables ``(B, Q, r)`` an attention module rotates its queries with.

    They are the module's ``position_embeddings``, or, where the module combines three M-RoPE axes
    itself (Qwen2-VL and Qwen2.5-VL before transformers 5.3: ``(3, B, Q, r)`` tables and the
    config's ``mrope_section``), their combination as the module makes it. None for anything else.
    """
    if not isinstance(position_embeddings, tuple) or len(position_embeddings) != 2:
        return None
    cos, sin = position_embeddings
    if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)):
        return None
    if cos.dim() == 4 and cos.shape[0] == 3:
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        section = rope.get("mrope_section") if isinstance(rope, dict) else None
        if section is None:
            return None
        sections = list(section) * 2
        cos, sin = (
            torch.cat([part[i % 3] for i, part in enumerate(table.split(sections, dim=-1))], dim=-1)
            for table in (cos, sin)
        )
    return (cos, sin) if cos.dim() == 3 else None


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the argument that takes the ``Cache`` in ``model.forward`` and ``model.generate``:
    ``cache`` from transformers 5.24 on (``past_key_values`` is deprecated there), else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


PER_TOKEN_IMAGE_INPUTS: tuple[str, ...] = ("token_type_ids", "mm_token_type_ids")
"""Forward inputs that mark image tokens for attention or positions of their own (Gemma 3's
bidirectional image blocks, Qwen-VL's M-RoPE)."""


def reads_images_as_text(model: torch.nn.Module, forward_inputs: Mapping[str, Any]) -> bool:
    """Whether ``model`` reads the image tokens of a forward given ``forward_inputs`` causally at
    1-D positions, like text: no M-RoPE offsets (Qwen-VL keeps ``rope_deltas``) and no per-token
    image attention (none of :data:`PER_TOKEN_IMAGE_INPUTS` given). Only then does a forward that
    continues an image prompt from its embeddings read it as one forward over the whole prompt."""
    inner = getattr(model, "model", None)
    return not hasattr(inner, "rope_deltas") and all(
        forward_inputs.get(name) is None for name in PER_TOKEN_IMAGE_INPUTS
    )


def prefill(
    model: torch.nn.Module, input_ids: torch.Tensor | None, cache: Cache, **model_inputs: Any
) -> torch.Tensor:
    """Run ``input_ids`` (and ``model_inputs``: a VLM's ``pixel_values``; ``inputs_embeds`` in place
    of ids...) through ``model`` into ``cache`` and return the last position's logits ``(B,
    vocab)``. Like ``generate``, only that position goes through the output head when the model
    supports ``logits_to_keep`` (the full ``(B, N, vocab)`` logits of a long prompt cost seconds
    and gigabytes)."""
    kwargs: dict[str, Any] = {cache_argument(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return model(input_ids=input_ids, **model_inputs, **kwargs).logits[:, -1]


def prefill_in_chunks(
    model: torch.nn.Module, input_ids: torch.Tensor, cache: Cache, chunk_size: int, session: Any = None
) -> torch.Tensor:
    """:func:`prefill` ``chunk_size`` tokens per forward and return the last position's logits.

    Under a press, pass its session (what ``with press(model) as session`` gives): the forwards
    then run inside ``session.chunked_prefill()``, so each chunk is compressed as it arrives."""
    block = session.chunked_prefill() if session is not None else contextlib.nullcontext()
    with block:
        for start in range(0, input_ids.shape[1], chunk_size):
            logits = prefill(model, input_ids[:, start : start + chunk_size], cache)
    return logits


def generation_state(model: torch.nn.Module) -> dict[str, Any]:
    """Model attributes that a generation continuing from a prefilled cache needs, whatever ran in
    between: M-RoPE models (Qwen2/2.5/3-VL) keep the images' position offset from the prefill in
    ``rope_deltas``. Empty for other models."""
    rope_deltas = getattr(getattr(model, "model", None), "rope_deltas", None)
    return {} if rope_deltas is None else {"rope_deltas": rope_deltas}


def restore_generation_state(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Set what :func:`generation_state` saved back on the model."""
    for name, value in state.items():
        setattr(getattr(model, "model", None), name, value)


def find_cache(*places: Any) -> Cache | None:
    """The first ``Cache`` among the values of the given mappings or model outputs (whatever the
    field is called in this transformers release), or None."""
    for place in places:
        values: Iterable[Any] = place.values() if hasattr(place, "values") else ()
        for value in values:
            if isinstance(value, Cache):
                return value
    return None
