"""Tiny random VLMs of the video-capable families, with a real video prompt and a real image prompt.

A helper module for the tests (not a test file). :func:`build_video_case` returns a
:class:`VideoCase`: the same tiny model as :func:`tests.families.build_case` (same config and
seed) plus two batch-1 prompts made by the family's own ``*Processor``: one with a short clip of
real frames drawn by :func:`tests.families.draw_image`, one with a single image.

transformers' video processors need torchvision, which does not install next to the CPU torch
wheel used here, so the processor gets :class:`FramesVideoProcessor` as its video processor: it
runs the family's own (PIL) image processor on every frame and lays the frames out as the
family's video processor does (Qwen-VL: pairs of frames stacked into temporal patches, with
``video_grid_thw``; LLaVA-NeXT-Video, LLaVA-OneVision and InternVL: a ``(videos, frames, C, H, W)``
tensor). The
processor itself expands the video placeholder (frame timestamps for Qwen3-VL, ``FrameN:`` image
blocks for InternVL) and builds ``mm_token_type_ids``, so the prompt is exactly the family's.

Video tokens of the row-0 prompt: qwen2_vl / qwen2_5_vl 64 (8 frames of 112 x 112, 4 temporal
groups of 4 x 4 merged patches), qwen3_vl 64 (8 frames of 128 x 128), llava_next_video 64
(16 frames of 56 x 56 pooled to 2 x 2), llava_onevision 33 (8 frames pooled to 2 x 2, plus one
newline token), internvl 64 (4 frames of 16 tokens, image placeholders).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.video_utils import VideoMetadata

from tests.families import (
    _image_processor,
    _instantiate,
    _left_pad_rows,
    _random_word_ids,
    _vlm_spec,
    _words,
    draw_image,
    vlm_processor,
)

VIDEO_FAMILIES: tuple[str, ...] = (
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "llava_next_video",
    "llava_onevision",
    "internvl",
)
FPS = 2.0


class FramesVideoProcessor:
    """A video processor made of a family's image processor (see the module docstring).

    Parameters
    ----------
    image_processor
        The family's image processor; it must map one frame to one tile (no crops, no anyres).
    layout : str
        ``"temporal_patches"`` (Qwen-VL) or ``"frames"`` (LLaVA-OneVision, InternVL).
    """

    def __init__(self, image_processor: Any, layout: str) -> None:
        self.image_processor = image_processor
        self.layout = layout
        self.merge_size = getattr(image_processor, "merge_size", 2)
        self.temporal_patch_size = getattr(image_processor, "temporal_patch_size", 2)

    def __call__(self, videos: Any, **kwargs: Any) -> BatchFeature:
        videos = [list(video) for video in videos]
        metadata = [
            VideoMetadata(total_num_frames=len(v), fps=FPS, frames_indices=list(range(len(v))))
            for v in videos
        ]
        if self.layout == "frames":
            stacks = [torch.cat([self._frame(frame) for frame in video]) for video in videos]
            return BatchFeature({"pixel_values_videos": torch.stack(stacks), "video_metadata": metadata})
        pixels, grids = [], []
        for video in videos:
            if len(video) % self.temporal_patch_size:  # as the video processors do: repeat the last frame
                video = video + [video[-1]] * (
                    self.temporal_patch_size - len(video) % self.temporal_patch_size
                )
            for start in range(0, len(video), self.temporal_patch_size):
                group = [
                    self.image_processor(images=[f], return_tensors="pt")
                    for f in video[start:][: self.temporal_patch_size]
                ]
                grid = group[0]["image_grid_thw"][0]
                # an image's patch holds its frame `temporal_patch_size` times: keep one copy per frame
                patches = [
                    g["pixel_values"].unflatten(1, (3, self.temporal_patch_size, -1))[:, :, 0] for g in group
                ]
                pixels.append(torch.stack(patches, dim=2).flatten(1))
            grids.append([len(video) // self.temporal_patch_size, int(grid[1]), int(grid[2])])
        return BatchFeature(
            {
                "pixel_values_videos": torch.cat(pixels),
                "video_grid_thw": torch.tensor(grids),
                "video_metadata": metadata,
            }
        )

    def _frame(self, frame: Any) -> torch.Tensor:
        pixel_values = self.image_processor(images=[frame], return_tensors="pt")["pixel_values"]
        return pixel_values.reshape(-1, *pixel_values.shape[-3:])[:1]  # (1, C, H, W)


@dataclass
class VideoCase:
    """A tiny model plus a video prompt and an image prompt (batch 1 each, unpadded)."""

    name: str
    model: torch.nn.Module
    processor: Any
    video_inputs: dict[str, torch.Tensor]
    image_inputs: dict[str, torch.Tensor]
    image_token_id: int
    video_token_id: int | None  # None where frames become image placeholders (InternVL)
    frames: list[Any]

    def padded_batch(self) -> dict[str, torch.Tensor]:
        """The video prompt and the image prompt, left-padded into one batch (video first)."""
        rows = [self.video_inputs, self.image_inputs]
        keys = set(rows[0]) & set(rows[1])
        shared = ("input_ids", "attention_mask", "mm_token_type_ids")
        batch = _left_pad_rows([{k: r[k] for k in keys if k in shared} for r in rows], shared)
        for row in rows:  # pixel tensors of both rows in row order (InternVL holds frames in pixel_values)
            for key, value in row.items():
                if key not in shared:
                    batch[key] = torch.cat([batch[key], value]) if key in batch else value
        return batch


_FRAME_SIDES = {
    "qwen2_vl": 112,
    "qwen2_5_vl": 112,
    "qwen3_vl": 128,
    "llava_next_video": 56,
    "llava_onevision": 56,
    "internvl": 112,
}
_FRAME_COUNTS = {"internvl": 4, "llava_next_video": 16}


def _frames(seed: int, name: str) -> list[Any]:
    side = _FRAME_SIDES[name]
    return [draw_image(seed * 1000 + 500 + i, side, side) for i in range(_FRAME_COUNTS.get(name, 8))]


def _video_processor(name: str, processor: Any) -> FramesVideoProcessor:
    side = _FRAME_SIDES[name]
    if name.startswith("qwen"):
        return FramesVideoProcessor(processor.image_processor, "temporal_patches")
    if name in ("llava_onevision", "llava_next_video"):
        # the video processors resize each frame to the vision tower's size: no anyres tiling
        frame_processor = _image_processor("llava", "Llava")(
            size={"height": side, "width": side},
            do_center_crop=False,
            image_mean=processor.image_processor.image_mean,
            image_std=processor.image_processor.image_std,
        )
        return FramesVideoProcessor(frame_processor, "frames")
    frame_processor = _image_processor("got_ocr2", "GotOcr2")(
        size={"height": side, "width": side}, crop_to_patches=False
    )
    return FramesVideoProcessor(frame_processor, "frames")


def _video_placeholder(name: str) -> str:
    if name.startswith("qwen"):
        return "<|vision_start|><|video_pad|><|vision_end|>"
    return "<video>"


def video_prompt_text(name: str, seed: int = 0) -> str:
    rng = random.Random(seed * 1000 + 999)
    return f"<s> {_words(_random_word_ids(rng, 20))} {_video_placeholder(name)} {_words(_random_word_ids(rng, 40))}"


def build_video_case(name: str, *, attn_implementation: str = "sdpa", seed: int = 0) -> VideoCase:
    """The tiny model of family ``name`` (as :func:`build_case` builds it) with a video and an image prompt."""
    if name not in VIDEO_FAMILIES:
        raise KeyError(f"{name!r} has no video case; known: {VIDEO_FAMILIES}")
    torch.manual_seed(seed)
    spec = _vlm_spec(name)
    model = _instantiate(spec.class_name, spec.config, attn_implementation, seed)
    processor = vlm_processor(name)
    processor.video_processor = _video_processor(name, processor)
    frames = _frames(seed, name)
    video = processor(text=[video_prompt_text(name, seed)], videos=[frames], return_tensors="pt")
    video_inputs = {k: v for k, v in video.items() if isinstance(v, torch.Tensor)}
    image_inputs = spec.make_row(seed, 0, 0)
    video_id = getattr(spec.config, "video_token_id", None) if name != "internvl" else None
    return VideoCase(
        name, model, processor, video_inputs, image_inputs, spec.image_token_id, video_id, frames
    )
