"""Randomly initialised models of real shapes for ``mixkv bench`` (timing needs no trained weights)."""

from __future__ import annotations

from typing import Any

import torch

#: Randomly initialised models for timing: name -> (family, shape). ``random-smollm2`` is
#: SmolLM2-135M's shape; ``random-llama3-1b`` Llama-3.2-1B's; ``random-qwen2vl-2b`` Qwen2-VL-2B's
#: language model (M-RoPE) with a one-block vision tower, fed text tokens only: image tokens cost
#: the decoder the same as text ones once embedded; ``random-qwen2.5-0.5b`` Qwen2.5-0.5B's (32k
#: context).
RANDOM_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "random-smollm2": (
        "llama",
        {
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
        },
    ),
    "random-llama3-1b": (
        "llama",
        {
            "vocab_size": 128256,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
        },
    ),
    "random-qwen2.5-0.5b": (
        "qwen2",
        {
            "vocab_size": 151936,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "max_position_embeddings": 32768,
        },
    ),
    "random-qwen2vl-2b": (
        "qwen2_vl",
        {
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [16, 24, 24],
            },
        },
    ),
}


def random_model(
    name: str, dtype: torch.dtype = torch.float32, layers: int | None = None, seed: int = 0
) -> torch.nn.Module:
    """A randomly initialised model of :data:`RANDOM_MODELS`, in eval mode with SDPA attention.

    Parameters
    ----------
    name : str
        A key of :data:`RANDOM_MODELS`.
    dtype : torch.dtype
        Parameter dtype.
    layers : int, optional
        Keep only the first ``layers`` decoder layers: timing per layer is unchanged, and the whole
        model may not fit a CPU's time.
    seed : int
        Seed of the initialisation.

    Returns
    -------
    torch.nn.Module
        The model.

    Raises
    ------
    ValueError
        For an unknown name, or ``layers`` outside 1 to the model's layer count.
    """
    import transformers as tf

    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; choose from {sorted(RANDOM_MODELS)}")
    family, shape = RANDOM_MODELS[name]
    if layers is not None:
        if not 1 <= layers <= shape["num_hidden_layers"]:
            raise ValueError(f"layers must be in [1, {shape['num_hidden_layers']}] for {name}, got {layers}")
        shape = {**shape, "num_hidden_layers": layers}
    text = {"max_position_embeddings": 65536, **shape, "tie_word_embeddings": True}
    config: Any
    cls: Any
    if family == "llama":
        config, cls = tf.LlamaConfig(**text), tf.LlamaForCausalLM
    elif family == "qwen2":
        config, cls = tf.Qwen2Config(**text), tf.Qwen2ForCausalLM
    else:
        vision = {"depth": 1, "embed_dim": 32, "hidden_size": shape["hidden_size"], "num_heads": 2}
        config = tf.Qwen2VLConfig(
            text_config=tf.Qwen2VLTextConfig(**text).to_dict(), vision_config=vision, tie_word_embeddings=True
        )
        cls = tf.Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    model: Any = cls._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def load_bench_model(
    name: str, dtype: torch.dtype = torch.float32, layers: int | None = None
) -> torch.nn.Module:
    """The model ``mixkv bench --model name`` times.

    Parameters
    ----------
    name : str
        A key of :data:`RANDOM_MODELS`, ``smollm2`` (real weights) or a model directory.
    dtype : torch.dtype
        Parameter dtype.
    layers : int, optional
        Random models only: keep the first ``layers`` decoder layers.

    Returns
    -------
    torch.nn.Module
        The model.

    Raises
    ------
    ValueError
        When ``layers`` is given for a model that is not a random one.
    """
    if name in RANDOM_MODELS:
        return random_model(name, dtype, layers)
    if layers is not None:
        raise ValueError("--layers only applies to the random-* models")
    from mixkv.model_loading import load_model

    model, _ = load_model(None if name == "smollm2" else name, dtype=dtype)
    return model
