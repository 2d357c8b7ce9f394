"""Tiny, randomly initialised, seeded models of every model family mixkv supports.

This is a helper module for the tests (not a test file). :func:`build_case` returns a
:class:`FamilyCase`: an ``eval()`` float32 model plus inputs that both ``model(**inputs)`` and
``model.generate(**inputs)`` accept.

* Text decoders are tiny (hidden 64, 3-4 layers, 4 query heads / 2 KV heads, head_dim 16,
  vocab 384) so every family runs in well under a second on a CPU.
* Vision-language models get a REAL image, drawn deterministically with Pillow, and turned into
  ``pixel_values`` by the family's own (PIL backend) image processor class, instantiated directly
  with small size settings; torchvision is not needed (``*ImageProcessorPil`` where the installed
  transformers has it, else the older releases' slow ``*ImageProcessor``, see
  :func:`_image_processor`).  The prompt is built by the family's own
  ``*Processor`` class (image-token expansion included) around an offline word-level tokenizer,
  except for SmolVLM whose processor needs the optional ``num2words`` package: there the prompt
  string is built with the processor module's own ``get_image_prompt_string`` helper.
* Every prompt is ~100-200 tokens in total and VLM prompts hold >= 30 image placeholder tokens,
  so that a KV budget of e.g. 48 tokens with an observation window of 8 really compresses.

The tokenizer's vocabulary is shared by all families: ids ``0..3`` are ``<pad> </s> <s> <unk>``,
the multimodal special tokens follow, and ids ``64..VOCAB_SIZE-1`` are plain words ``w64`` ...
whose id is their number, so that random text ids map 1:1 onto text.

Other choices worth knowing:

* weights use ``initializer_range=0.2`` (HF's 0.02 gives near-uniform attention in such small
  models, which would make every KV-selection score a tie);
* ``model.generation_config.eos_token_id`` is ``None`` so generation always yields exactly
  ``max_new_tokens`` tokens (``pad_token_id`` is 0);
* ``batch_size > 1``: row ``i`` loses ``left_pad * i`` words, so ``left_pad * (batch_size - 1)``
  must stay <= 56 for VLMs and <= 128 for LLMs;
* weight matrices HF initialises to zero (Gemma3's multimodal projection, InternVL's vision
  position embeddings) are re-drawn at random, else all Gemma3 image tokens would be zero vectors;
* llama and mistral have the same parameter layout, so with the same seed their weights match.

Per family: decoder layers path, text ``model_type``, image tokens / prompt length (row 0), and
the image processor that made ``pixel_values``:

* llama, mistral, qwen2, qwen3, phi3: ``model.layers``, model_type = family name, 144 tokens;
  mistral has ``sliding_window=None``, qwen3 has q/k norm, phi3 a fused ``qkv_proj``.
* gemma3_text: ``model.layers`` / gemma3_text, 4 layers (sliding, sliding, full, sliding),
  ``sliding_window=16``, 144 tokens.
* qwen2_vl / qwen2_5_vl / qwen3_vl: ``model.language_model.layers`` / ``<family>_text``,
  48 / 131, ``Qwen2VLImageProcessorPil`` (patch 14, or 16 for qwen3_vl); inputs also carry
  ``image_grid_thw`` and ``mm_token_type_ids`` (M-RoPE positions are the model's own).
* llava: ``model.language_model.layers`` / llama, 64 / 145, ``LlavaImageProcessorPil``.
* llava_next, llava_next_video: ``model.language_model.layers`` / llama, 70 / 151,
  ``LlavaNextImageProcessorPil`` (llava_next_video: same image path, ``<video>`` placeholder).
* llava_onevision: ``model.language_model.layers`` / qwen2, 70 / 151,
  ``LlavaOnevisionImageProcessorPil``.
* internvl: ``model.language_model.layers`` / qwen2, 48 / 131, ``GotOcr2ImageProcessorPil``.
* idefics3, smolvlm: ``model.text_model.layers`` / llama, 80 / 172,
  ``Idefics3ImageProcessorPil`` / ``SmolVLMImageProcessorPil`` (2x2 tiles + global image).
* gemma3: ``model.language_model.layers`` / gemma3_text (same 4 layer types and window as
  gemma3_text), 36 / 119, ``Gemma3ImageProcessorPil``; inputs also carry ``token_type_ids``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "ALL_FAMILIES",
    "LLM_FAMILIES",
    "VLM_FAMILIES",
    "FamilyCase",
    "build_case",
    "draw_image",
]

# ---------------------------------------------------------------------------------------------
# shared sizes
# ---------------------------------------------------------------------------------------------

VOCAB_SIZE = 384
HIDDEN = 64
INTERMEDIATE = 128
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 16
NUM_LAYERS = 3
INIT_RANGE = 0.2
GEMMA3_SLIDING_WINDOW = 16
GEMMA3_LAYER_TYPES = ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
FIRST_WORD_ID = 64

LLM_PROMPT_LEN = 144  # tokens of an LLM prompt (row 0)
VLM_TEXT_BEFORE = 20  # random words before the image
VLM_TEXT_AFTER = 60  # random words after the image (row i loses ``left_pad * i`` of them)
MIN_TEXT_AFTER = 4

_SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "</s>",
    "<s>",
    "<unk>",
    "<image>",
    "<video>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)
assert len(_SPECIAL_TOKENS) <= FIRST_WORD_ID
TOKEN_IDS: dict[str, int] = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}

LLM_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")
VLM_FAMILIES: tuple[str, ...] = (
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "llava",
    "llava_next",
    "llava_next_video",
    "llava_onevision",
    "internvl",
    "idefics3",
    "smolvlm",
    "gemma3",
)
ALL_FAMILIES: tuple[str, ...] = LLM_FAMILIES + VLM_FAMILIES


@dataclass
class FamilyCase:
    """A tiny model of one family plus inputs ready for ``model(**inputs)`` / ``model.generate(**inputs)``."""

    name: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    is_vlm: bool
    image_token_id: int | None
    num_layers: int
    num_kv_heads: int
    head_dim: int
    # extra information about the text decoder
    layer_types: tuple[str, ...] | None = None  # e.g. gemma3: mix of "sliding_attention"/"full_attention"
    sliding_window: int | None = None
    pad_token_id: int = PAD_ID
    # the unpadded batch-1 inputs of every row (``rows[0]`` is the normal prompt), e.g. to compare a
    # padded batch against single-row runs
    rows: list[dict[str, torch.Tensor]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def num_image_tokens(self) -> int:
        """Image placeholder tokens in row 0 of the prompt (0 for LLMs)."""
        if self.image_token_id is None:
            return 0
        return int((self.inputs["input_ids"][0] == self.image_token_id).sum())


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def _text_kwargs(**overrides: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 1024,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": False,
    }
    kw.update(overrides)
    return kw


def _random_word_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(FIRST_WORD_ID, VOCAB_SIZE) for _ in range(n)]


def _words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def _make_tokenizer(extra_special_tokens: dict[str, str] | None = None) -> Any:
    """An offline word-level tokenizer over the shared vocabulary (``w64`` -> id 64, specials first)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(TOKEN_IDS)
    vocab.update({f"w{i}": i for i in range(FIRST_WORD_ID, VOCAB_SIZE)})
    for i in range(len(_SPECIAL_TOKENS), FIRST_WORD_ID):
        vocab[f"<unused_{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=extra_special_tokens or {},
    )


def _image_processor(model_dir: str, prefix: str) -> Any:
    """The family's PIL/numpy image processor class (no torchvision needed), e.g. ``"qwen2_vl", "Qwen2VL"``.

    Recent transformers name it ``<prefix>ImageProcessorPil`` in ``image_processing_pil_<model_dir>``;
    older releases (e.g. 5.2) have no such module and the slow class is plain ``<prefix>ImageProcessor``.
    """
    import importlib

    import transformers as tf

    module_name = f"transformers.models.{model_dir}.image_processing_pil_{model_dir}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return getattr(tf, f"{prefix}ImageProcessor")
    return getattr(module, f"{prefix}ImageProcessorPil")


def draw_image(seed: int, width: int, height: int) -> Image.Image:
    """A deterministic, real RGB picture: a gradient background, shapes, lines and some text."""
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height))
    px = img.load()
    c0 = [rng.randrange(256) for _ in range(3)]
    c1 = [rng.randrange(256) for _ in range(3)]
    for y in range(height):
        t = y / max(1, height - 1)
        row = tuple(int(a + (b - a) * t) for a, b in zip(c0, c1, strict=True))
        for x in range(width):
            px[x, y] = row  # type: ignore[index]
    draw = ImageDraw.Draw(img)

    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    def box() -> tuple[int, int, int, int]:
        x0, y0 = rng.randrange(width - 8), rng.randrange(height - 8)
        return (x0, y0, rng.randrange(x0 + 4, width), rng.randrange(y0 + 4, height))

    for _ in range(3):
        draw.rectangle(box(), fill=colour(), outline=colour())
    for _ in range(3):
        draw.ellipse(box(), fill=colour(), outline=colour(), width=2)
    for _ in range(2):
        pts = [(rng.randrange(width), rng.randrange(height)) for _ in range(3)]
        draw.polygon(pts, fill=colour())
    for _ in range(4):
        draw.line(
            [(rng.randrange(width), rng.randrange(height)), (rng.randrange(width), rng.randrange(height))],
            fill=colour(),
            width=rng.randrange(1, 4),
        )
    # the built-in bitmap font: identical pixels whether or not Pillow has FreeType
    loader = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)
    font = loader()
    text = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(6))
    draw.text(
        (rng.randrange(max(1, width // 3)), rng.randrange(max(1, height // 2))),
        text,
        fill=colour(),
        font=font,
    )
    return img


def _left_pad_rows(rows: list[dict[str, torch.Tensor]], seq_keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Left-pads the per-row sequence tensors to a common length and concatenates everything on dim 0."""
    max_len = max(int(r["input_ids"].shape[1]) for r in rows)
    out: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        parts = []
        for r in rows:
            t = r[key]
            if key in seq_keys:
                pad = max_len - t.shape[1]
                fill = PAD_ID if key == "input_ids" else 0
                t = torch.cat([torch.full((t.shape[0], pad), fill, dtype=t.dtype), t], dim=1)
            parts.append(t)
        out[key] = torch.cat(parts, dim=0)
    return out


_SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def _llm_rows(seed: int, batch_size: int, left_pad: int) -> list[dict[str, torch.Tensor]]:
    rows = []
    for i in range(batch_size):
        rng = random.Random(seed * 1000 + i)
        n = LLM_PROMPT_LEN - left_pad * i
        if n < 16:
            raise ValueError(f"left_pad={left_pad} is too large for batch_size={batch_size}")
        ids = torch.tensor([[BOS_ID, *_random_word_ids(rng, n - 1)]])
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return rows


def _vlm_prompt(seed: int, row: int, left_pad: int, image_marker: str, prefix: str = "<s>") -> str:
    rng = random.Random(seed * 1000 + row)
    n_after = VLM_TEXT_AFTER - left_pad * row
    if n_after < MIN_TEXT_AFTER:
        raise ValueError(f"left_pad={left_pad} is too large for row {row}")
    before = _words(_random_word_ids(rng, VLM_TEXT_BEFORE))
    after = _words(_random_word_ids(rng, n_after))
    return f"{prefix} {before} {image_marker} {after}"


def _tensor_dict(batch: Any, keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in batch.items():
        if keys is not None and k not in keys:
            continue
        if isinstance(v, torch.Tensor):
            out[k] = v
        else:
            out[k] = torch.as_tensor(v)
    return out


# ---------------------------------------------------------------------------------------------
# LLM families
# ---------------------------------------------------------------------------------------------


def _llm_config(name: str) -> Any:
    import transformers as tf

    if name == "llama":
        return tf.LlamaConfig(**_text_kwargs())
    if name == "mistral":
        return tf.MistralConfig(**_text_kwargs(sliding_window=None))
    if name == "qwen2":
        return tf.Qwen2Config(**_text_kwargs(use_sliding_window=False))
    if name == "qwen3":
        return tf.Qwen3Config(**_text_kwargs(use_sliding_window=False))
    if name == "phi3":
        kw = _text_kwargs(sliding_window=None)
        kw.pop("head_dim")
        return tf.Phi3Config(**kw)
    if name == "gemma3_text":
        return tf.Gemma3TextConfig(**_gemma3_text_kwargs())
    raise KeyError(name)


_LLM_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _gemma3_text_kwargs() -> dict[str, Any]:
    return _text_kwargs(
        num_hidden_layers=len(GEMMA3_LAYER_TYPES),
        layer_types=list(GEMMA3_LAYER_TYPES),
        sliding_window=GEMMA3_SLIDING_WINDOW,
        query_pre_attn_scalar=HEAD_DIM,
        tie_word_embeddings=True,
    )


# ---------------------------------------------------------------------------------------------
# VLM families: each builder returns (config, model class name, row-input maker, image token id)
# ---------------------------------------------------------------------------------------------

RowMaker = Callable[[int, int, int], dict[str, torch.Tensor]]  # (seed, row, left_pad) -> row inputs


@dataclass
class _VlmSpec:
    config: Any
    class_name: str
    make_row: RowMaker
    image_token_id: int


def _qwen_vl_spec(name: str) -> _VlmSpec:
    import transformers as tf

    text: Any
    vision: dict[str, Any]
    config: Any
    proc_cls: Any
    ids: dict[str, Any] = {
        "image_token_id": TOKEN_IDS["<|image_pad|>"],
        "video_token_id": TOKEN_IDS["<|video_pad|>"],
        "vision_start_token_id": TOKEN_IDS["<|vision_start|>"],
        "vision_end_token_id": TOKEN_IDS["<|vision_end|>"],
    }
    if name == "qwen2_vl":
        patch = 14
        text = tf.Qwen2VLTextConfig(
            **_text_kwargs(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
        )
        vision = {
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": HIDDEN,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": patch,
        }
        config = tf.Qwen2VLConfig(text_config=text.to_dict(), vision_config=vision, **ids)
        cls, proc_cls = "Qwen2VLForConditionalGeneration", tf.Qwen2VLProcessor
    elif name == "qwen2_5_vl":
        patch = 14
        text = tf.Qwen2_5_VLTextConfig(
            **_text_kwargs(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
        )
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": patch,
            "out_hidden_size": HIDDEN,
            "window_size": 56,  # 2x2 merged tokens per window: windowed + full attention both used
            "fullatt_block_indexes": [1],
        }
        config = tf.Qwen2_5_VLConfig(text_config=text.to_dict(), vision_config=vision, **ids)
        cls, proc_cls = "Qwen2_5_VLForConditionalGeneration", tf.Qwen2_5_VLProcessor
    elif name == "qwen3_vl":
        patch = 16
        text = tf.Qwen3VLTextConfig(
            **_text_kwargs(
                rope_parameters={
                    "rope_type": "default",
                    "mrope_section": [4, 2, 2],
                    "mrope_interleaved": True,
                }
            )
        )
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": patch,
            "out_hidden_size": HIDDEN,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        }
        config = tf.Qwen3VLConfig(text_config=text.to_dict(), vision_config=vision, **ids)
        cls, proc_cls = "Qwen3VLForConditionalGeneration", tf.Qwen3VLProcessor
    else:
        raise KeyError(name)

    factor = patch * 2  # patch_size * merge_size
    # 12 x 16 patches -> 6 x 8 = 48 merged image tokens
    height, width = 6 * factor, 8 * factor
    image_processor = _image_processor("qwen2_vl", "Qwen2VL")(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=factor * factor,
        max_pixels=height * width,
    )
    tokenizer = _make_tokenizer()
    processor = _without_video_processor(proc_cls)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None
    )

    def make_row(seed: int, row: int, left_pad: int) -> dict[str, torch.Tensor]:
        text = _vlm_prompt(seed, row, left_pad, "<|vision_start|><|image_pad|><|vision_end|>")
        image = draw_image(seed * 1000 + row, width, height)
        batch = processor(text=[text], images=[image], return_tensors="pt")
        return _tensor_dict(batch)

    return _VlmSpec(config, cls, make_row, ids["image_token_id"])


def _without_video_processor(proc_cls: type) -> type:
    """The family's processor class, accepting ``video_processor=None``.

    Video processors need torchvision, which is not installed, so ``ProcessorMixin``'s class check of
    the (unused) ``video_processor`` argument fails; this subclass skips only that check.
    """

    class _ImageOnlyProcessor(proc_cls):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    _ImageOnlyProcessor.__name__ = proc_cls.__name__
    _ImageOnlyProcessor.__qualname__ = proc_cls.__qualname__
    return _ImageOnlyProcessor


def _clip_vision(image_size: int, patch: int = 14) -> dict[str, Any]:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch,
        "projection_dim": 32,
    }


def _siglip_vision(image_size: int, patch: int) -> dict[str, Any]:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch,
    }


def _llava_spec() -> _VlmSpec:
    import transformers as tf

    side = 112  # 8 x 8 patches of 14 -> 64 image tokens (CLS dropped by the "default" strategy)
    image_id = TOKEN_IDS["<image>"]
    config = tf.LlavaConfig(
        vision_config=_clip_vision(side),
        text_config={"model_type": "llama", **_text_kwargs()},
        image_token_index=image_id,
        image_seq_length=(side // 14) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    image_processor = _image_processor("llava", "Llava")(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    processor = tf.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=_make_tokenizer({"image_token": "<image>"}),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )

    def make_row(seed: int, row: int, left_pad: int) -> dict[str, torch.Tensor]:
        text = _vlm_prompt(seed, row, left_pad, "<image>")
        image = draw_image(seed * 1000 + row, 150, 120)
        return _tensor_dict(processor(text=[text], images=[image], return_tensors="pt"))

    return _VlmSpec(config, "LlavaForConditionalGeneration", make_row, image_id)


def _llava_next_spec(name: str = "llava_next") -> _VlmSpec:
    """LLaVA-NeXT, or LLaVA-NeXT-Video (same image path, plus a ``<video>`` placeholder)."""
    import transformers as tf

    side = 56  # 4 x 4 patches of 14 per crop
    pinpoints = [[56, 112], [112, 56], [112, 112]]
    image_id = TOKEN_IDS["<image>"]
    video = name == "llava_next_video"
    config_cls = tf.LlavaNextVideoConfig if video else tf.LlavaNextConfig
    extra: dict[str, Any] = {"video_token_index": TOKEN_IDS["<video>"]} if video else {}
    config = config_cls(
        vision_config=_clip_vision(side),
        text_config={"model_type": "llama", **_text_kwargs()},
        image_token_index=image_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(side // 14) ** 2,
        **extra,
    )
    image_processor = _image_processor("llava_next", "LlavaNext")(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints,
    )
    processor_kwargs: dict[str, Any] = {
        "image_processor": image_processor,
        "patch_size": 14,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
    }
    processor: Any
    if video:
        processor = _without_video_processor(tf.LlavaNextVideoProcessor)(
            tokenizer=_make_tokenizer({"image_token": "<image>", "video_token": "<video>"}),
            video_processor=None,
            **processor_kwargs,
        )
    else:
        processor = tf.LlavaNextProcessor(
            tokenizer=_make_tokenizer({"image_token": "<image>"}), **processor_kwargs
        )

    def make_row(seed: int, row: int, left_pad: int) -> dict[str, torch.Tensor]:
        text = _vlm_prompt(seed, row, left_pad, "<image>")
        image = draw_image(seed * 1000 + row, 120, 96)
        return _tensor_dict(processor(text=[text], images=[image], return_tensors="pt"))

    class_name = "LlavaNextVideoForConditionalGeneration" if video else "LlavaNextForConditionalGeneration"
    return _VlmSpec(config, class_name, make_row, image_id)


def _llava_onevision_spec() -> _VlmSpec:
    import transformers as tf

    side, patch = 56, 14  # 4 x 4 patches per crop, SigLIP has no CLS token
    pinpoints = [[56, 112], [112, 56], [112, 112]]
    image_id = TOKEN_IDS["<image>"]
    config = tf.LlavaOnevisionConfig(
        vision_config=_siglip_vision(side, patch),
        text_config={"model_type": "qwen2", **_text_kwargs()},
        image_token_index=image_id,
        video_token_index=TOKEN_IDS["<video>"],
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )
    image_processor = _image_processor("llava_onevision", "LlavaOnevision")(
        size={"height": side, "width": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints,
    )
    processor = _without_video_processor(tf.LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=_make_tokenizer({"image_token": "<image>", "video_token": "<video>"}),
        video_processor=None,
        num_image_tokens=(side // patch) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )

    def make_row(seed: int, row: int, left_pad: int) -> dict[str, torch.Tensor]:
        text = _vlm_prompt(seed, row, left_pad, "<image>")
        image = draw_image(seed * 1000 + row, 120, 96)
        return _tensor_dict(processor(text=[text], images=[image], return_tensors="pt"))

    return _VlmSpec(config, "LlavaOnevisionForConditionalGeneration", make_row, image_id)


def _internvl_spec() -> _VlmSpec:
    import transformers as tf

    side, patch = 112, 14  # 8 x 8 patches per tile, pixel-shuffled by 0.5 -> 16 tokens per tile
    image_id = TOKEN_IDS["<IMG_CONTEXT>"]
    config = tf.InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": [side, side],
            "patch_size": [patch, patch],
        },
        text_config={"model_type": "qwen2", **_text_kwargs()},
        image_token_id=image_id,
        image_seq_length=16,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
    )
    image_processor = _image_processor("got_ocr2", "GotOcr2")(
        size={"height": side, "width": side}, crop_to_patches=True, min_patches=1, max_patches=3
    )
    tokenizer = _make_tokenizer(
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        }
    )
    processor = _without_video_processor(tf.InternVLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, image_seq_length=16
    )

    def make_row(seed: int, row: int, left_pad: int) -> dict[str, torch.Tensor]:
        text = _vlm_prompt(seed, row, left_pad, "<IMG_CONTEXT>")
        image = draw_image(seed * 1000 + row, 224, 112)
        return _tensor_dict(processor(text=[text], images=[image], return_tensors="pt"))

    return _VlmSpec(config, "InternVLForConditionalGeneration", make_row, image_id)


def _idefics_like_spec(name: str) -> _VlmSpec:
    import transformers as tf

    side, patch = 64, 8  # 8 x 8 patches per tile, pixel-shuffled by 2 -> 16 tokens per tile
    seq_len = (side // patch) ** 2 // 4
    image_id = TOKEN_IDS["<image>"]
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": side,
        "patch_size": patch,
    }
    text = {"model_type": "llama", **_text_kwargs()}
    config: Any
    if name == "idefics3":
        config = tf.Idefics3Config(
            vision_config=vision, text_config=text, image_token_id=image_id, scale_factor=2
        )
        image_processor: Any = _image_processor("idefics3", "Idefics3")(
            size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side}, do_image_splitting=True
        )
        processor: Any = tf.Idefics3Processor(
            image_processor=image_processor, tokenizer=_make_tokenizer(), image_seq_len=seq_len
        )
        cls = "Idefics3ForConditionalGeneration"
    else:
        config = tf.SmolVLMConfig(
            vision_config=vision, text_config=text, image_token_id=image_id, scale_factor=2
        )
        image_processor = _image_processor("smolvlm", "SmolVLM")(
            size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side}, do_image_splitting=True
        )
        processor = None
        cls = "SmolVLMForConditionalGeneration"
    tokenizer = _make_tokenizer()

    def make_row(seed: int, row: int, left_pad: int) -> dict[str, torch.Tensor]:
        image = draw_image(seed * 1000 + row, 120, 80)
        if processor is not None:
            text = _vlm_prompt(seed, row, left_pad, "<image>")
            return _tensor_dict(processor(text=[text], images=[[image]], return_tensors="pt"))
        # SmolVLMProcessor needs the optional `num2words` package, so expand the prompt with the
        # processor module's own helper and tokenize it with the same tokenizer.
        try:
            from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string
        except ModuleNotFoundError as exc:
            # transformers 5.2's module imports its torchvision video processor; Idefics3's helper
            # expands the image the same way (its last parameter is named `global_img_token`)
            if exc.name != "torchvision":
                raise
            from transformers.models.idefics3.processing_idefics3 import get_image_prompt_string

        img = image_processor(images=[[image]], return_row_col_info=True, return_tensors="pt")
        # positional: (rows, cols, image_seq_len, fake_token_around_image, image_token, global token)
        image_str = get_image_prompt_string(
            img["rows"][0][0],
            img["cols"][0][0],
            seq_len,
            "<fake_token_around_image>",
            "<image>",
            "<global-img>",
        )
        text = _vlm_prompt(seed, row, left_pad, image_str)
        enc = tokenizer([text], return_tensors="pt")
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "pixel_values": img["pixel_values"],
            "pixel_attention_mask": img["pixel_attention_mask"],
        }

    return _VlmSpec(config, cls, make_row, image_id)


def _gemma3_spec() -> _VlmSpec:
    import transformers as tf

    side, patch = 96, 8  # 12 x 12 patches avg-pooled 2x2 -> 6 x 6 = 36 image tokens
    mm_tokens = 36
    image_id = TOKEN_IDS["<image_soft_token>"]
    config = tf.Gemma3Config(
        vision_config=_siglip_vision(side, patch),
        text_config=_gemma3_text_kwargs(),
        mm_tokens_per_image=mm_tokens,
        boi_token_index=TOKEN_IDS["<start_of_image>"],
        eoi_token_index=TOKEN_IDS["<end_of_image>"],
        image_token_index=image_id,
    )
    image_processor = _image_processor("gemma3", "Gemma3")(
        size={"height": side, "width": side}, do_pan_and_scan=False
    )
    tokenizer = _make_tokenizer(
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    )
    processor = tf.Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=mm_tokens
    )

    def make_row(seed: int, row: int, left_pad: int) -> dict[str, torch.Tensor]:
        text = _vlm_prompt(seed, row, left_pad, "<start_of_image>")
        image = draw_image(seed * 1000 + row, 128, 100)
        return _tensor_dict(processor(text=[text], images=[[image]], return_tensors="pt"))

    return _VlmSpec(config, "Gemma3ForConditionalGeneration", make_row, image_id)


def _vlm_spec(name: str) -> _VlmSpec:
    if name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        return _qwen_vl_spec(name)
    if name == "llava":
        return _llava_spec()
    if name in ("llava_next", "llava_next_video"):
        return _llava_next_spec(name)
    if name == "llava_onevision":
        return _llava_onevision_spec()
    if name == "internvl":
        return _internvl_spec()
    if name in ("idefics3", "smolvlm"):
        return _idefics_like_spec(name)
    if name == "gemma3":
        return _gemma3_spec()
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------


def _set_init_range(config: Any) -> None:
    """A larger-than-default random init, so that attention is not near-uniform.

    With HF's 0.02 the tiny decoders attend almost uniformly (normalised entropy ~0.99); with 0.2
    attention is peaked like in trained models (entropy ~0.55-0.6), which makes KV selection matter.
    """
    for cfg in (config, *(getattr(config, k, None) for k in ("text_config", "vision_config"))):
        if cfg is not None and hasattr(cfg, "initializer_range"):
            cfg.initializer_range = INIT_RANGE


def _fill_zero_weights(model: torch.nn.Module, seed: int) -> None:
    """Random-initialises weight matrices that HF zero-initialises.

    Gemma3's ``multi_modal_projector.mm_input_projection_weight`` starts at zero, which would make
    every image token's embedding (hence its key and value) exactly zero; InternVL's vision
    ``position_embeddings`` start at zero too.  Trained checkpoints have neither.
    """
    generator = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.ndim >= 2 and not bool(param.any()):
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_RANGE)


def _instantiate(class_name: str, config: Any, attn_implementation: str, seed: int) -> torch.nn.Module:
    import transformers as tf

    _set_init_range(config)
    model_cls = getattr(tf, class_name)
    model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    _fill_zero_weights(model, seed)
    model.eval()
    gen = model.generation_config
    gen.pad_token_id = PAD_ID
    gen.bos_token_id = BOS_ID
    # no early stop: random weights emit `</s>` now and then, and tests want exactly `max_new_tokens`
    gen.eos_token_id = None
    return model


def build_case(
    name: str,
    *,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    batch_size: int = 1,
    left_pad: int = 0,
) -> FamilyCase:
    """Builds a fresh tiny model of family ``name`` and its inputs.

    Same ``seed`` -> identical weights and inputs. With ``batch_size > 1`` row 0 is the normal prompt
    and row ``i`` a different prompt of the same family whose text is ``left_pad * i`` tokens shorter,
    left-padded with ``left_pad * i`` pad tokens (``attention_mask`` 0); every VLM row has an image.
    """
    if name not in ALL_FAMILIES:
        raise KeyError(f"unknown family {name!r}; known: {ALL_FAMILIES}")
    if batch_size < 1 or left_pad < 0:
        raise ValueError("batch_size must be >= 1 and left_pad >= 0")

    torch.manual_seed(seed)
    if name in LLM_FAMILIES:
        config = _llm_config(name)
        model = _instantiate(_LLM_CLASSES[name], config, attn_implementation, seed)
        rows = _llm_rows(seed, batch_size, left_pad)
        image_token_id = None
    else:
        spec = _vlm_spec(name)
        config = spec.config
        model = _instantiate(spec.class_name, config, attn_implementation, seed)
        rows = [spec.make_row(seed, i, left_pad) for i in range(batch_size)]
        image_token_id = spec.image_token_id
    inputs = _left_pad_rows(rows, _SEQ_KEYS)

    text_config: Any = model.config.get_text_config()  # type: ignore[operator,union-attr]
    layer_types = getattr(text_config, "layer_types", None)
    return FamilyCase(
        name=name,
        model=model,
        inputs=inputs,
        is_vlm=name in VLM_FAMILIES,
        image_token_id=image_token_id,
        num_layers=int(text_config.num_hidden_layers),
        num_kv_heads=int(text_config.num_key_value_heads),
        head_dim=int(
            getattr(text_config, "head_dim", None)
            or text_config.hidden_size // text_config.num_attention_heads
        ),
        layer_types=tuple(layer_types) if layer_types is not None else None,
        sliding_window=getattr(text_config, "sliding_window", None),
        rows=rows,
        extra={"text_model_type": text_config.model_type},
    )


def vlm_processor(name: str) -> Any:
    """The ``*Processor`` that :func:`build_case` uses for VLM family ``name`` (offline tokenizer).

    The family builders keep their processor inside the row maker, so it is read back from there.
    Raises ``KeyError`` for families that have no processor object here (LLMs and ``smolvlm``).
    """
    if name not in VLM_FAMILIES:
        raise KeyError(f"{name!r} is not a VLM family; known: {VLM_FAMILIES}")
    make_row = _vlm_spec(name).make_row
    cells = dict(zip(make_row.__code__.co_freevars, make_row.__closure__ or (), strict=True))
    processor = cells["processor"].cell_contents if "processor" in cells else None
    if processor is None:
        raise KeyError(f"family {name!r} builds its prompts without a processor object")
    return processor
