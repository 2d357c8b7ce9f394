"""The tiny VLM: a LLaVA model whose vision encoder was trained here and whose language model is
the frozen Qwen2.5-Coder-0.5B-Instruct.

Why LLaVA: it is the plainest standard ``transformers`` VLM class (``LlavaForConditionalGeneration``:
vision tower -> two-layer projector -> any causal language model), mixkv supports it, and it
accepts a Qwen2 language model and a CLIP vision tower of any size. The vision tower is a 2-layer
CLIP ViT with 16-pixel patches on 320 x 320 images, so one image is 400 image tokens (the CLS token
is dropped), one per character cell of :mod:`mixkv.tiny_vlm.images`.

Only the vision tower and the projector are stored in the repository
(``mixkv/tiny_vlm/weights/vision.safetensors``, 11.7 MB). :func:`tiny_vlm_path` joins them once
with the language model's weights from the ``mixkv[qwen]`` packages into a standard model
directory in the mixkv cache, which ``AutoModelForImageTextToText`` and ``AutoProcessor`` load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mixkv.tiny_vlm.images import CELL, IMAGE_SIZE

__all__ = [
    "IMAGE_TOKEN",
    "VISION_WEIGHTS",
    "image_tokens_per_image",
    "llava_config",
    "pixel_values",
    "tiny_vlm_path",
    "vision_config",
]

IMAGE_TOKEN = "<|image_pad|>"
"""Placeholder the processor expands to one token per image cell: Qwen2.5's own (unused by the text
model) image-pad token, so the vocabulary and embedding table stay exactly the language model's."""
VISION_WEIGHTS = Path(__file__).parent / "weights" / "vision.safetensors"
"""Trained vision tower and projector (LLaVA parameter names), written by ``mixkv.tiny_vlm.train``."""
_DIR_PREFIX = "tiny-vlm"
_MARKER = "mixkv_tiny_vlm.json"
_NORM_MEAN = (0.5, 0.5, 0.5)
_NORM_STD = (0.5, 0.5, 0.5)

# Chat template: ChatML as Qwen2.5 writes it; an image item becomes the image placeholder followed
# by a newline, so the language model reads "<image rows>\n<question>".
_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|image_pad|>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def vision_config() -> Any:
    """The CLIP vision tower's configuration: 2 layers, width 256, 16-pixel patches, 320-pixel images."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=CELL,
        num_channels=3,
    )


def image_tokens_per_image() -> int:
    """Image tokens one image becomes (one per cell; the CLS token is dropped)."""
    return (IMAGE_SIZE // CELL) ** 2


def llava_config(text_config: Any, image_token_id: int, projector_hidden_act: str = "relu6") -> Any:
    """The LLaVA configuration joining :func:`vision_config` and a language model's configuration.

    The projector's activation is ``relu6`` (LLaVA's default is GELU) because the shipped projector
    is a saturating lookup from character logits to character embeddings (``mixkv.tiny_vlm.train``).
    """
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision_config(),
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=image_tokens_per_image(),
        projector_hidden_act=projector_hidden_act,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def pixel_values(images: list[Any]) -> torch.Tensor:
    """Images as the processor feeds them to the vision tower (rescaled to [0, 1], normalised).

    Training uses this instead of the processor for speed; a test checks that both agree.
    """
    import numpy as np

    batch = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    mean = np.asarray(_NORM_MEAN, dtype=np.float32)
    std = np.asarray(_NORM_STD, dtype=np.float32)
    batch = (batch / 255.0 - mean) / std
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def _weights_digest() -> str:
    digest = hashlib.sha256(VISION_WEIGHTS.read_bytes()).hexdigest()
    return digest[:16]


def _build_processor(language_model_dir: Path) -> Any:
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(language_model_dir)
    if len(tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)) != 1:
        raise ValueError(f"the language model's tokenizer has no single {IMAGE_TOKEN!r} token.")
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(_NORM_MEAN),
        image_std=list(_NORM_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=CELL,
        vision_feature_select_strategy="default",
        chat_template=_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def _assemble(out_dir: Path, language_model_dir: Path, weights_digest: str) -> None:
    """Write the joined LLaVA directory (config, processor, weights) into ``out_dir``."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    processor = _build_processor(language_model_dir)
    image_token_id = int(processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    text_config = AutoConfig.from_pretrained(language_model_dir)
    config = llava_config(text_config, image_token_id)
    config.architectures = ["LlavaForConditionalGeneration"]
    state: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(str(language_model_dir / "model.safetensors")).items():
        if name.startswith("model."):
            state["model.language_model." + name[len("model.") :]] = tensor
        elif name == "lm_head.weight":
            state[name] = tensor
        else:
            raise ValueError(f"unexpected language-model parameter {name!r} in {language_model_dir}.")
    state.update(load_file(str(VISION_WEIGHTS)))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        marker = {"vision_weights_sha256_16": weights_digest, "language_model": str(language_model_dir)}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / _MARKER).is_file():  # another process did not finish it either
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def tiny_vlm_path() -> Path:
    """The tiny VLM as a standard model directory, joined once from its two parts.

    The directory is ``<mixkv cache>/tiny-vlm-<first 16 hex of the vision weights' sha256>``, so
    retrained weights never reuse a stale directory.

    Raises
    ------
    FileNotFoundError
        If the trained vision weights are missing (the package was installed without them) or the
        language model's packages (``mixkv[qwen]``) are not installed.
    """
    from mixkv.weights import cache_root, qwen_model_path

    if not VISION_WEIGHTS.is_file():
        raise FileNotFoundError(
            f"The tiny VLM's vision weights ({VISION_WEIGHTS}) are not in this install (a source "
            "checkout without them, or a package built without its data files). Reinstall mixkv from "
            "the repository, or retrain them with `mixkv train-tiny-vlm` (about 50 minutes on "
            "2 CPU cores; it writes that file)."
        )
    digest = _weights_digest()
    out_dir = cache_root() / f"{_DIR_PREFIX}-{digest}"
    if (out_dir / _MARKER).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _assemble(out_dir, qwen_model_path(), digest)
    return out_dir
