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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixkv.tiny_vlm.images import CHARSET, FAMILIES, render
from mixkv.tiny_vlm.model import VISION_WEIGHTS, llava_config, pixel_values, vision_config

__all__ = ["VisionPart", "charset_embeddings", "main", "train"]


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


def _losses(
    tokens: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total loss, cell accuracy, image accuracy) of image tokens against the charset embeddings.

    A cell counts as correct when its nearest charset embedding is its label's.
    """
    flat = tokens.reshape(-1, tokens.shape[-1])
    cosines = nn.functional.normalize(flat, dim=-1) @ nn.functional.normalize(targets, dim=-1).T
    cross_entropy = nn.functional.cross_entropy(cosines / COSINE_TEMPERATURE, labels.reshape(-1))
    squared = (flat - targets[labels.reshape(-1)]).pow(2).sum(-1).mean() / targets.pow(2).sum(-1).mean()
    correct = (torch.cdist(flat, targets).argmin(-1) == labels.reshape(-1)).reshape(labels.shape)
    return cross_entropy + squared, correct.float().mean(), correct.all(-1).float().mean()


def train(
    steps: int,
    batch_size: int,
    learning_rate: float,
    out: Path,
    *,
    seed: int = 0,
    log_every: int = 50,
    validate_every: int = 250,
) -> dict[str, Any]:
    """Train and save the vision part; return the learning curve and final figures."""
    from transformers import AutoConfig

    from mixkv.models import _qwen_model_path

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    language_model_dir = _qwen_model_path()
    targets = charset_embeddings(language_model_dir)
    model = VisionPart(AutoConfig.from_pretrained(language_model_dir))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    validation = _batch("validation", seed, 0, 48)
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        pixels, labels = _batch("train", seed, (step - 1) * batch_size, batch_size)
        loss, cell_accuracy, _ = _losses(model(pixels), labels, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % log_every == 0 or step == steps:
            elapsed = time.perf_counter() - start
            print(
                f"step {step}/{steps}  loss {loss.item():.4f}  cell acc {cell_accuracy.item():.4f}  "
                f"{elapsed / step:.2f} s/step  eta {elapsed / step * (steps - step) / 60:.1f} min",
                flush=True,
            )
        if step % validate_every == 0 or step == steps:
            with torch.no_grad():
                v_loss, v_cells, v_images = _losses(model(validation[0]), validation[1], targets)
            point = {
                "step": step,
                "seconds": round(time.perf_counter() - start, 1),
                "train_loss": round(loss.item(), 5),
                "validation_loss": round(v_loss.item(), 5),
                "validation_cell_accuracy": round(v_cells.item(), 5),
                "validation_image_exact": round(v_images.item(), 4),
            }
            curve.append(point)
            print("validation", json.dumps(point), flush=True)
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - start, 1),
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
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--validate-every", type=int, default=250)
    parser.add_argument("--out", type=Path, default=VISION_WEIGHTS, help="weights file (safetensors)")
    args = parser.parse_args(argv)
    train(
        args.steps,
        args.batch_size,
        args.learning_rate,
        args.out,
        seed=args.seed,
        log_every=args.log_every,
        validate_every=args.validate_every,
    )


if __name__ == "__main__":
    main()
