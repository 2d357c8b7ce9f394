"""Offline head statistics measured on a model: what MixKV and SparseMM can otherwise only guess.

:func:`calibrate` runs the user's own prompts (and images) through the model and returns the
tables described in :mod:`mixkv.presses.head_tables` (``mixkv calibrate MODEL_DIR --prompts FILE
--out FILE`` writes them to a file).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from mixkv.functional import head_redundancy
from mixkv.integration.chat_prompts import render_user_turn, tokenizer_of, user_content
from mixkv.integration.decoder_layout import cache_argument, describe_decoder
from mixkv.integration.tensor_parallel import refuse_tensor_parallel
from mixkv.presses.head_tables import HeadStatistics


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    samples: Iterable[Mapping[str, torch.Tensor]],
    *,
    window_size: int = 32,
) -> HeadStatistics:
    """Measure head statistics on ``samples`` (model inputs, batch 1 each).

    The model must use eager attention (``attn_implementation="eager"``): visual-head scores are
    read from the attention probabilities.
    """
    refuse_tensor_parallel(model, "calibrate", "each rank would measure only its own KV heads' statistics")
    layout = describe_decoder(model)
    if layout.text_config._attn_implementation != "eager":
        raise ValueError(
            "calibrate needs attention probabilities: load the model with attn_implementation='eager'"
        )
    redundancy = torch.zeros(layout.num_layers, layout.num_kv_heads)
    visual = torch.zeros(layout.num_layers, layout.num_heads)
    visual_redundancy = torch.zeros(layout.num_layers, layout.num_kv_heads)
    text_redundancy = torch.zeros(layout.num_layers, layout.num_kv_heads)
    count = visual_count = 0
    for sample in samples:
        input_ids = sample.get("input_ids")
        if input_ids is None or input_ids.shape[0] != 1:
            raise ValueError("calibration samples must hold input_ids of batch size 1")
        cache = DynamicCache(config=layout.text_config)
        outputs = model(**sample, **{cache_argument(model): cache}, use_cache=True, output_attentions=True)
        held: list[torch.Tensor] = []
        for layer_idx in range(layout.num_layers):
            keys = getattr(cache.layers[layer_idx], "keys", None)
            if not isinstance(keys, torch.Tensor):
                raise ValueError(
                    f"layer {layer_idx} of the cache holds no keys; this model cannot be calibrated"
                )
            held.append(keys.float())
            redundancy[layer_idx] += head_redundancy(held[-1])[0].cpu()
        count += 1
        masks = layout.visual_token_masks(input_ids[0])
        if masks is not None and bool((masks[0] | masks[1]).any()):
            is_visual = (masks[0] | masks[1]).to(outputs.attentions[0].device)
            for layer_idx, attention in enumerate(outputs.attentions[: layout.num_layers]):
                window = attention[0, :, -window_size:, :]  # (H, W, N)
                if window.shape[-1] == is_visual.shape[0]:
                    visual[layer_idx] += window[..., is_visual].sum(-1).mean(-1).float().cpu()
                keys = held[layer_idx]
                if keys.shape[2] == is_visual.shape[0]:  # not a sliding-window layer
                    on_keys = is_visual.to(keys.device)
                    visual_redundancy[layer_idx] += head_redundancy(keys[:, :, on_keys])[0].cpu()
                    text_redundancy[layer_idx] += head_redundancy(keys[:, :, ~on_keys])[0].cpu()
            visual_count += 1
    if count == 0:
        raise ValueError("no calibration samples were given")
    model_type = str(getattr(model.config, "model_type", "unknown"))
    return HeadStatistics(
        model_type=model_type,
        num_samples=count,
        redundancy=(redundancy / count).clamp(0, 1),
        visual_head_scores=visual / visual_count if visual_count else None,
        visual_redundancy=(visual_redundancy / visual_count).clamp(0, 1) if visual_count else None,
        text_redundancy=(text_redundancy / visual_count).clamp(0, 1) if visual_count else None,
    )


def read_prompts(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON ({error})") from error
            if "text" not in entry:
                raise ValueError(
                    f'{path}:{number}: each JSON line needs a "text" field (and optional "images", "videos")'
                )
            videos = list(entry.get("videos", []))
            for video in videos:
                if not isinstance(video, str) and not (
                    isinstance(video, list) and video and all(isinstance(frame, str) for frame in video)
                ):
                    raise ValueError(
                        f'{path}:{number}: each entry of "videos" must be a video file path or a non-empty '
                        f"list of frame image paths, got {video!r}"
                    )
            prompts.append({"text": entry["text"], "images": list(entry.get("images", [])), "videos": videos})
        else:
            prompts.append({"text": line, "images": [], "videos": []})
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def _open_image(name: str, base: Path) -> Any:
    from PIL import Image

    image_path = Path(name) if Path(name).is_absolute() else base / name
    if not image_path.is_file():
        raise FileNotFoundError(f"image {image_path} named in the prompts file does not exist")
    with Image.open(image_path) as image:
        return image.convert("RGB")


def _open_video(video: str | list[str], base: Path) -> Any:
    """A list of frames (PIL images), or a video file's path for the processor to decode."""
    if isinstance(video, list):
        return [_open_image(frame, base) for frame in video]
    video_path = Path(video) if Path(video).is_absolute() else base / video
    if not video_path.is_file():
        raise FileNotFoundError(f"video {video_path} named in the prompts file does not exist")
    return str(video_path)


def encode_prompt(processor: Any, prompt: dict[str, Any], base: Path) -> dict[str, torch.Tensor]:
    if not prompt["images"] and not prompt["videos"]:
        return dict(tokenizer_of(processor)(prompt["text"], return_tensors="pt"))
    images = [_open_image(name, base) for name in prompt["images"]]
    if prompt["videos"] and getattr(processor, "video_processor", None) is None:
        raise ValueError(
            f"{type(processor).__name__} of this model has no video processor, so it cannot encode the "
            "prompts' videos (transformers' video processors need torchvision: install it, or drop the videos)"
        )
    videos = [_open_video(video, base) for video in prompt["videos"]]
    text = render_user_turn(processor, user_content(prompt["text"], images=len(images), videos=len(videos)))
    media: dict[str, Any] = {"images": images or None, "videos": videos or None}
    return dict(processor(text=text, **media, return_tensors="pt"))
