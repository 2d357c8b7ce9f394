"""Train the tiny VLM's vision tower and projector: ``python -m mixkv.tiny_vlm.train``.

Dense supervision per image cell. Every training image is rendered on the fly by
:mod:`mixkv.tiny_vlm.images`, which knows the character each cell shows; for every cell the
projector's output (a vector in the language model's input space) is pulled towards the frozen
language model's input embedding of that character:

    loss = cross_entropy(cos(z, e_c) / 0.05 over the charset c, label)
           + ||z - e_label||^2 / mean ||e||^2

The cross-entropy term makes the right character the most similar embedding (on cosines, so its
logits stay bounded: on squared distances the first runs diverged); the squared-error term makes
the output *equal* that embedding, so the frozen language model receives what it would
receive if the image's text had been typed one character per token. The language model is never
run during training, which is why this fits in minutes on two CPU cores.

Seeded and deterministic on a given machine (fixed seed, fixed thread count, images drawn from
seeded generators). Progress is printed every ``--log-every`` steps; the learning curve is written
next to the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixkv.tiny_vlm.images import CHARSET, FAMILIES, render
from mixkv.tiny_vlm.model import VISION_WEIGHTS, llava_config, pixel_values, vision_config

__all__ = ["PHASES", "Phase", "VisionPart", "charset_embeddings", "main", "train"]


class VisionPart(nn.Module):
    """The trained part of the tiny VLM: LLaVA's vision tower and projector, as LLaVA runs them."""

    def __init__(self, text_config: Any) -> None:
        super().__init__()
        from transformers import CLIPVisionModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.vision_tower = CLIPVisionModel(vision_config())
        self.multi_modal_projector = LlavaMultiModalProjector(llava_config(text_config, 0))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image tokens ``[batch, cells, text hidden]`` (last layer, CLS dropped, as LLaVA does)."""
        hidden = self.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        return self.multi_modal_projector(hidden)

    def llava_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under the names ``LlavaForConditionalGeneration`` loads them by."""
        return {f"model.{name}": tensor.detach().contiguous() for name, tensor in self.state_dict().items()}


def charset_embeddings(language_model_dir: Path) -> torch.Tensor:
    """The language model's input embedding of every :data:`CHARSET` character, ``[len(CHARSET), hidden]``.

    Raises
    ------
    ValueError
        If a character is not a single token of the tokenizer.
    """
    from safetensors import safe_open
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(language_model_dir)
    ids = []
    for char in CHARSET:
        token_ids = tokenizer.encode(char, add_special_tokens=False)
        if len(token_ids) != 1:
            raise ValueError(f"character {char!r} is {len(token_ids)} tokens for this tokenizer; need 1.")
        ids.append(token_ids[0])
    with safe_open(str(language_model_dir / "model.safetensors"), framework="pt") as weights:
        table = weights.get_tensor("model.embed_tokens.weight")
    return table[torch.tensor(ids)].float()


def _batch(split: str, seed: int, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``start .. start + size`` of a split and seed (families in turn) and their cell labels."""
    index = {char: i for i, char in enumerate(CHARSET)}
    images, labels = [], []
    for k in range(start, start + size):
        example = render(FAMILIES[k % len(FAMILIES)], seed, k // len(FAMILIES), split)
        images.append(example.image)
        labels.append([index[char] for char in example.labels])
    return pixel_values(images), torch.tensor(labels)


COSINE_TEMPERATURE = 0.05


@dataclass(frozen=True)
class Phase:
    """One stage of training: its own AdamW optimiser and warm-up + cosine learning-rate schedule."""

    steps: int
    learning_rate: float
    squared_error_weight: float


PHASES: tuple[Phase, ...] = (Phase(1000, 5e-4, 1.0), Phase(400, 2e-4, 10.0))
"""Learn to classify cells, then (squared error x10) to output the embeddings exactly."""


def _losses(
    tokens: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, squared_error_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of image tokens against the charset embeddings, and accuracies.

    ``cell_accuracy``: the nearest charset embedding (Euclidean, what the language model is most
    likely to read) is the label's; ``cell_accuracy_cosine``: the most similar one is;
    ``image_exact``: every cell of an image is right (Euclidean).
    """
    flat = tokens.reshape(-1, tokens.shape[-1])
    flat_labels = labels.reshape(-1)
    cosines = nn.functional.normalize(flat, dim=-1) @ nn.functional.normalize(targets, dim=-1).T
    cross_entropy = nn.functional.cross_entropy(cosines / COSINE_TEMPERATURE, flat_labels)
    squared = (flat - targets[flat_labels]).pow(2).sum(-1).mean() / targets.pow(2).sum(-1).mean()
    correct = (torch.cdist(flat, targets).argmin(-1) == flat_labels).reshape(labels.shape)
    figures = {
        "cross_entropy": cross_entropy.item(),
        "squared_error": squared.item(),
        "cell_accuracy": correct.float().mean().item(),
        "cell_accuracy_cosine": (cosines.argmax(-1) == flat_labels).float().mean().item(),
        "image_exact": correct.all(-1).float().mean().item(),
    }
    return cross_entropy + squared_error_weight * squared, figures


def train(
    out: Path,
    *,
    phases: tuple[Phase, ...] = PHASES,
    batch_size: int = 16,
    seed: int = 0,
    log_every: int = 25,
    validate_every: int = 100,
    init: Path | None = None,
    skip_phases: int = 0,
) -> dict[str, Any]:
    """Train and save the vision part; return the learning curve and final figures.

    ``init`` + ``skip_phases``: start from the weights a run saved after its first ``skip_phases``
    phases (``<out>.phase<k>.safetensors``); every phase has a fresh optimiser and draws the training
    images that follow the previous phases', so this continues that run exactly.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from mixkv.models import _qwen_model_path

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    language_model_dir = _qwen_model_path()
    targets = charset_embeddings(language_model_dir)
    model = VisionPart(AutoConfig.from_pretrained(language_model_dir))
    if init is not None:
        model.load_state_dict({k.removeprefix("model."): v for k, v in load_file(str(init)).items()})
    validation = _batch("validation", seed, 0, 48)
    curve: list[dict[str, Any]] = []
    start = time.perf_counter()
    first_image = sum(phase.steps for phase in phases[:skip_phases]) * batch_size
    out.parent.mkdir(parents=True, exist_ok=True)
    for number, phase in enumerate(phases[skip_phases:], start=skip_phases + 1):
        optimizer = torch.optim.AdamW(model.parameters(), lr=phase.learning_rate, weight_decay=0.01)
        warmup = max(1, phase.steps // 20)

        def schedule(step: int, warmup: int = warmup, total: int = phase.steps) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        phase_start = time.perf_counter()
        for step in range(1, phase.steps + 1):
            pixels, labels = _batch("train", seed, first_image, batch_size)
            first_image += batch_size
            loss, figures = _losses(model(pixels), labels, targets, phase.squared_error_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if step % log_every == 0 or step == phase.steps:
                elapsed = time.perf_counter() - phase_start
                print(
                    f"phase {number} step {step}/{phase.steps}  loss {loss.item():.4f}  "
                    f"cell acc {figures['cell_accuracy']:.4f}  {elapsed / step:.2f} s/step  "
                    f"eta {elapsed / step * (phase.steps - step) / 60:.1f} min",
                    flush=True,
                )
            if step % validate_every == 0 or step == phase.steps:
                with torch.no_grad():
                    v_loss, v_figures = _losses(
                        model(validation[0]), validation[1], targets, phase.squared_error_weight
                    )
                point = {
                    "phase": number,
                    "step": step,
                    "seconds": round(time.perf_counter() - start, 1),
                    "train_loss": round(loss.item(), 5),
                    "validation_loss": round(v_loss.item(), 5),
                    **{f"validation_{k}": round(v, 5) for k, v in v_figures.items()},
                }
                curve.append(point)
                print("validation", json.dumps(point), flush=True)
        if number < len(phases):
            save_file(model.llava_state_dict(), str(out.with_suffix(f".phase{number}.safetensors")))
    summary = {
        "phases": [vars(phase) for phase in phases],
        "batch_size": batch_size,
        "seed": seed,
        "started_from": None if init is None else f"{init.name} (after phase {skip_phases})",
        "train_seconds_this_run": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "curve": curve,
    }
    save_file(model.llava_state_dict(), str(out), metadata={"mixkv_training": json.dumps(summary)})
    out.with_name("training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python -m mixkv.tiny_vlm.train --help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=VISION_WEIGHTS, help="weights file (safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="weights saved after phase --skip-phases")
    parser.add_argument("--skip-phases", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.init is None) != (args.skip_phases == 0):
        parser.error("--init and --skip-phases go together")
    train(args.out, seed=args.seed, init=args.init, skip_phases=args.skip_phases)


if __name__ == "__main__":
    main()
