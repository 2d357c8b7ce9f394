"""Head statistics tables: per-(layer, KV head) redundancy and per-(layer, head) visual scores.

They are measured by ``mixkv calibrate`` (:mod:`mixkv.integration.calibration`) and read here by
the presses that use them (MixKV's redundancy, SparseMM's visual-head scores):

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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
