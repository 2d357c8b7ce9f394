"""Offline head statistics: per-(layer, KV head) redundancy and per-(layer, head) visual scores.

``mixkv calibrate MODEL_DIR --prompts FILE --out FILE`` measures, on the user's own prompts (and
images), what MixKV and SparseMM can otherwise only guess:

* ``redundancy`` ``(layers, kv_heads)``: mean over prompts of each head's mean pairwise cosine
  similarity of its (post-rotary) keys - the ``r_h`` of the MixKV score, as an offline table;
* ``visual_head_scores`` ``(layers, heads)``: mean over prompts of the attention mass that the last
  ``window_size`` prompt tokens put on visual (image and video) tokens, per query head - SparseMM's
  head scores. Only for prompts with images or videos;
* ``visual_redundancy`` and ``text_redundancy`` ``(layers, kv_heads)``: the same redundancy measured
  over the visual tokens' keys only and over the other (text) tokens' keys only - the paper's
  motivating comparison (image tokens are more redundant than text). Only for prompts with images
  or videos.

Files are JSON (``.json``) or safetensors (``.safetensors``) and carry the model's shape, which
presses check before use.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixkv.functional import head_redundancy

TABLE_KEYS = ("redundancy", "visual_head_scores", "visual_redundancy", "text_redundancy")


@dataclass
class HeadStatistics:
    """Per-head statistics measured on calibration prompts."""

    model_type: str
    num_samples: int
    redundancy: torch.Tensor
    visual_head_scores: torch.Tensor | None
    visual_redundancy: torch.Tensor | None = None
    text_redundancy: torch.Tensor | None = None

    def redundancy_summary(self) -> str | None:
        """One line comparing the heads' key redundancy over visual and over text tokens (the
        paper's motivating measurement), or None without visual tables."""
        visual, text = self.visual_redundancy, self.text_redundancy
        if visual is None or text is None:
            return None
        return (
            f"key redundancy over visual vs text tokens, mean of {visual.numel()} KV heads: "
            f"{visual.mean():.3f} vs {text.mean():.3f}; visual higher in {int((visual > text).sum())} "
            f"of {visual.numel()} heads"
        )

    def _tables(self) -> dict[str, torch.Tensor | None]:
        return {key: getattr(self, key) for key in TABLE_KEYS}

    def save(self, path: str | Path) -> Path:
        """Write as JSON or safetensors, by the file suffix."""
        path = Path(path)
        meta = {
            "model_type": self.model_type,
            "num_samples": self.num_samples,
            "num_layers": int(self.redundancy.shape[0]),
            "num_kv_heads": int(self.redundancy.shape[1]),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            payload: dict[str, Any] = dict(meta)
            for key, table in self._tables().items():
                payload[key] = None if table is None else table.tolist()
            path.write_text(json.dumps(payload, indent=1))
        elif path.suffix == ".safetensors":
            from safetensors.torch import save_file

            tensors = {key: table.contiguous() for key, table in self._tables().items() if table is not None}
            save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})
        else:
            raise ValueError(f"unknown statistics file type {path.suffix!r}: use .json or .safetensors")
        return path


def load_head_statistics(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tables of a statistics file (``{"redundancy": ..., "visual_head_scores": ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"head statistics file {path} not found; create it with `mixkv calibrate`")
    if path.suffix == ".json":
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); re-run `mixkv calibrate`") from error
        return {
            key: torch.tensor(payload[key], dtype=torch.float32)
            for key in TABLE_KEYS
            if payload.get(key) is not None
        }
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {key: value.float() for key, value in load_file(str(path)).items()}
    raise ValueError(f"unknown statistics file type {path.suffix!r}: use .json or .safetensors")


def resolve_head_table(source: torch.Tensor | str | Path | None, key: str) -> torch.Tensor:
    """A 2-D float table from a tensor, or from the ``key`` table of a statistics file."""
    if isinstance(source, (str, Path)):
        tables = load_head_statistics(source)
        if key not in tables:
            raise ValueError(
                f"{source} holds no {key!r} table (it has {sorted(tables)}); calibrate with images"
            )
        table = tables[key]
    elif isinstance(source, torch.Tensor):
        table = source.detach().float().cpu()
    else:
        raise TypeError(f"{key} must be a tensor or a file path, got {type(source).__name__}")
    if table.dim() != 2:
        raise ValueError(f"{key} table must be 2-D (layers, heads), got shape {tuple(table.shape)}")
    if bool((table < 0).any()) or not bool(torch.isfinite(table).all()):
        raise ValueError(f"{key} table must hold finite non-negative values")
    return table


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
    from transformers import DynamicCache

    from mixkv.integration.models import cache_argument, describe_decoder

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


def _read_prompts(path: Path) -> list[dict[str, Any]]:
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


def _encode(processor: Any, prompt: dict[str, Any], base: Path) -> dict[str, torch.Tensor]:
    if not prompt["images"] and not prompt["videos"]:
        tokenizer = getattr(processor, "tokenizer", processor)
        return dict(tokenizer(prompt["text"], return_tensors="pt"))
    images = [_open_image(name, base) for name in prompt["images"]]
    if prompt["videos"] and getattr(processor, "video_processor", None) is None:
        raise ValueError(
            f"{type(processor).__name__} of this model has no video processor, so it cannot encode the "
            "prompts' videos (transformers' video processors need torchvision: install it, or drop the videos)"
        )
    videos = [_open_video(video, base) for video in prompt["videos"]]
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    content += [{"type": "video"} for _ in videos]
    content.append({"type": "text", "text": prompt["text"]})
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    media: dict[str, Any] = {"images": images or None, "videos": videos or None}
    return dict(processor(text=text, **media, return_tensors="pt"))


def main(argv: list[str] | None = None) -> int:
    """``mixkv calibrate MODEL_DIR --prompts FILE --out FILE``."""
    parser = argparse.ArgumentParser(prog="mixkv calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="local model directory (LLM or VLM)")
    parser.add_argument(
        "--prompts",
        required=True,
        type=Path,
        help='text lines, or JSON lines {"text": ..., "images": [paths], "videos": [[frame paths] or path]}',
    )
    parser.add_argument("--out", required=True, type=Path, help="output .json or .safetensors")
    parser.add_argument("--window-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.out.suffix not in (".json", ".safetensors"):
        parser.error("--out must end in .json or .safetensors")
    from mixkv.models import load_model

    prompts = _read_prompts(args.prompts)
    model, processor = load_model(str(args.model), attn_implementation="eager")
    samples = [_encode(processor, prompt, args.prompts.parent) for prompt in prompts]
    stats = calibrate(model, samples, window_size=args.window_size)
    stats.save(args.out)
    print(
        f"wrote {args.out}: {stats.num_samples} prompts, redundancy {tuple(stats.redundancy.shape)}", end=""
    )
    print(
        ""
        if stats.visual_head_scores is None
        else f", visual_head_scores {tuple(stats.visual_head_scores.shape)}"
    )
    summary = stats.redundancy_summary()
    if summary is not None:
        print(summary)
    return 0
