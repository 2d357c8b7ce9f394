"""Train the tiny VLM's vision tower and projector: ``mixkv train-tiny-vlm``.

Dense supervision per image cell. Every training image is rendered on the fly by
:mod:`mixkv.tiny_vlm.images`, which knows the character each cell shows. Two phases:

1. **embedding** (1,000 steps): a training-only two-layer head maps the tower's cell features to
   the frozen language model's input embedding of the cell's character,

       loss = cross_entropy(cos(z, e_c) / 0.05 over the charset c, label) + ||z - e_label||^2 / mean ||e||^2

   which teaches the tower features that tell the characters apart.
2. **lookup** (1,000 steps): a linear classifier on the same features, one logit per character,
   trained with a one-vs-rest logistic loss (tower and classifier both learn).

The shipped projector is then *built*, not fitted: LLaVA's standard projector
``linear_2(act(linear_1(x)))`` with ``act = relu6`` and

    linear_1 = SHARPNESS * classifier + 3,    linear_2 = [e_c / 6 for every character c]

so a cell whose logit is >= 3 / SHARPNESS for one character and <= -3 / SHARPNESS for all others
becomes *exactly* that character's input embedding: ``relu6`` saturates at 0 and 6. Exactness is
the point: an encoder fitted to the embeddings by regression was 98.7% right by nearest embedding
per cell, yet its outputs were about half an embedding's norm off target and the frozen language
model read only 2 of 8 boards; snapping the same outputs to the nearest embedding read 15 of 16
(docs/tiny-vlm.md). The language model is never run during training, which is why this fits in
about 50 minutes on two CPU cores.

Seeded and deterministic on a given machine (fixed seed, fixed thread count, images drawn from
seeded generators). Progress is printed every ``--log-every`` steps; the learning curve is written
next to the weights.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mixkv.tiny_vlm.images import CHARSET, FAMILIES, render
from mixkv.tiny_vlm.model import llava_config, pixel_values, vision_config

__all__ = [
    "PHASES",
    "SHARPNESS",
    "Phase",
    "VisionPart",
    "charset_embeddings",
    "lookup_projector",
    "train",
]

SHARPNESS = 6.0
"""Slope of the projector's ``relu6`` units per classifier logit: a logit at least 0.5 from zero
gives an exact 0 or 1 weight on its character's embedding."""
COSINE_TEMPERATURE = 0.05


class VisionPart(nn.Module):
    """The shipped part of the tiny VLM: LLaVA's vision tower and projector, as LLaVA runs them."""

    def __init__(self, text_config: Any) -> None:
        super().__init__()
        from transformers import CLIPVisionModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.vision_tower = CLIPVisionModel(vision_config())
        self.multi_modal_projector = LlavaMultiModalProjector(llava_config(text_config, 0))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image tokens ``[batch, cells, text hidden]`` (last layer, CLS dropped, as LLaVA does)."""
        return self.multi_modal_projector(_cell_features(self.vision_tower, pixels))


def _cell_features(vision_tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]


class _Trainee(nn.Module):
    """The vision tower with the two training heads (embedding phase, lookup phase)."""

    def __init__(self, text_config: Any) -> None:
        super().__init__()
        from transformers import CLIPVisionModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        # Construction order fixes the seeded initial weights: tower, then the embedding head, as the
        # recorded phase-1 run built them.
        self.vision_tower = CLIPVisionModel(vision_config())
        self.embedding_head = LlavaMultiModalProjector(
            llava_config(text_config, 0, projector_hidden_act="gelu")
        )
        self.classifier = nn.Linear(vision_config().hidden_size, len(CHARSET))

    def trained_modules(self, phase: Phase) -> list[nn.Module]:
        """What ``phase`` trains: the tower and that phase's head."""
        return [self.vision_tower, self.embedding_head if phase.objective == "embedding" else self.classifier]


def lookup_projector(classifier: nn.Linear, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """LLaVA projector parameters that turn the classifier's logits into character embeddings.

    Unit ``c`` of ``linear_1`` is ``SHARPNESS * logit_c + 3`` (clipped to [0, 6] by ``relu6``) and
    column ``c`` of ``linear_2`` is ``e_c / 6``; the other hidden units are zero.
    """
    characters, features = classifier.weight.shape
    hidden = embeddings.shape[1]
    weight_1 = torch.zeros(hidden, features)
    bias_1 = torch.zeros(hidden)
    weight_2 = torch.zeros(hidden, hidden)
    weight_1[:characters] = SHARPNESS * classifier.weight.detach()
    bias_1[:characters] = SHARPNESS * classifier.bias.detach() + 3.0
    weight_2[:, :characters] = embeddings.T / 6.0
    return {
        "linear_1.weight": weight_1,
        "linear_1.bias": bias_1,
        "linear_2.weight": weight_2,
        "linear_2.bias": torch.zeros(hidden),
    }


def _llava_state_dict(trainee: _Trainee, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """The shipped parameters under the names ``LlavaForConditionalGeneration`` loads them by."""
    state = {f"vision_tower.{k}": v for k, v in trainee.vision_tower.state_dict().items()}
    state.update(
        {f"multi_modal_projector.{k}": v for k, v in lookup_projector(trainee.classifier, embeddings).items()}
    )
    return {f"model.{name}": tensor.detach().contiguous() for name, tensor in state.items()}


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


@dataclass(frozen=True)
class Phase:
    """One stage of training: its objective, its own AdamW optimiser and warm-up + cosine schedule."""

    steps: int
    learning_rate: float
    objective: Literal["embedding", "lookup"]


PHASES: tuple[Phase, ...] = (Phase(1000, 5e-4, "embedding"), Phase(1000, 5e-4, "lookup"))
"""Learn features that tell the characters apart, then a linear read-out of them."""


def _embedding_loss(
    tokens: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cosine cross-entropy + normalised squared error of image tokens against the charset embeddings.

    ``cell_accuracy``: the nearest charset embedding (Euclidean) is the label's.
    """
    flat = tokens.reshape(-1, tokens.shape[-1])
    flat_labels = labels.reshape(-1)
    cosines = nn.functional.normalize(flat, dim=-1) @ nn.functional.normalize(targets, dim=-1).T
    cross_entropy = nn.functional.cross_entropy(cosines / COSINE_TEMPERATURE, flat_labels)
    squared = (flat - targets[flat_labels]).pow(2).sum(-1).mean() / targets.pow(2).sum(-1).mean()
    correct = torch.cdist(flat, targets).argmin(-1) == flat_labels
    return cross_entropy + squared, {
        "squared_error": squared.item(),
        "cell_accuracy": correct.float().mean().item(),
    }


def _lookup_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """One-vs-rest logistic loss and accuracies.

    The loss is summed over characters and averaged separately over background cells (space,
    row end) and character cells, which then count equally: most cells are background, and the
    rarest looks (white marks on dark tags, white titles on a title bar) are character cells.
    ``cell_accuracy``: the largest logit is the label's; ``cell_exact``: the built projector outputs
    exactly the label's embedding (its logit >= 3 / SHARPNESS, every other <= -3 / SHARPNESS);
    ``character_cell_exact``: the same over character cells; ``image_exact``: every cell of an
    image is exact.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    one_hot = nn.functional.one_hot(flat_labels, flat.shape[-1]).to(flat.dtype)
    per_cell = nn.functional.binary_cross_entropy_with_logits(flat, one_hot, reduction="none").sum(-1)
    character = ~torch.isin(flat_labels, torch.tensor([CHARSET.index(" "), CHARSET.index("\n")]))
    loss = per_cell[~character].mean() + per_cell[character].mean()
    margin = 3.0 / SHARPNESS
    exact = (((flat >= margin) == one_hot.bool()) & ((flat >= margin) | (flat <= -margin))).all(-1)
    return loss, {
        "cell_accuracy": (flat.argmax(-1) == flat_labels).float().mean().item(),
        "cell_exact": exact.float().mean().item(),
        "character_cell_exact": exact[character].float().mean().item(),
        "image_exact": exact.reshape(labels.shape).all(-1).float().mean().item(),
    }


def _phase_loss(
    trainee: _Trainee, phase: Phase, pixels: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    features = _cell_features(trainee.vision_tower, pixels)
    if phase.objective == "embedding":
        return _embedding_loss(trainee.embedding_head(features), labels, targets)
    return _lookup_loss(trainee.classifier(features), labels)


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

    ``init`` + ``skip_phases``: start from the checkpoint a run saved after its first ``skip_phases``
    phases (``<out>.phase<k>.safetensors``: the tower and both training heads); every phase has a
    fresh optimiser and draws the training images that follow the previous phases', so this
    continues that run exactly.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from mixkv.weights import qwen_model_path

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    language_model_dir = qwen_model_path()
    targets = charset_embeddings(language_model_dir)
    model = _Trainee(AutoConfig.from_pretrained(language_model_dir))
    if init is not None:
        model.load_state_dict(load_file(str(init)))
    validation = _batch("validation", seed, 0, 48)
    curve: list[dict[str, Any]] = []
    start = time.perf_counter()
    first_image = sum(phase.steps for phase in phases[:skip_phases]) * batch_size
    out.parent.mkdir(parents=True, exist_ok=True)
    for number, phase in enumerate(phases[skip_phases:], start=skip_phases + 1):
        trained = [p for module in model.trained_modules(phase) for p in module.parameters()]
        optimizer = torch.optim.AdamW(trained, lr=phase.learning_rate, weight_decay=0.01)
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
            loss, figures = _phase_loss(model, phase, pixels, labels, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
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
                    v_loss, v_figures = _phase_loss(model, phase, *validation, targets)
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
            checkpoint = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(checkpoint, str(out.with_suffix(f".phase{number}.safetensors")))
    summary = {
        "phases": [vars(phase) for phase in phases],
        "sharpness": SHARPNESS,
        "batch_size": batch_size,
        "seed": seed,
        "started_from": None if init is None else f"{init.name} (after phase {skip_phases})",
        "train_seconds_this_run": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "curve": curve,
    }
    save_file(_llava_state_dict(model, targets), str(out), metadata={"mixkv_training": json.dumps(summary)})
    out.with_name("training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
