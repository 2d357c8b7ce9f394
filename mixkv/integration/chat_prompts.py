"""Chat prompts of a model's processor: one user turn with images, videos and text.

A vision-language model's prompt is the processor's chat template applied to one user turn whose
content lists the visual entries, then the text (the processor expands each placeholder into the
image's or video's tokens). Without a chat template the prompt is built from the processor's
placeholder tokens. The evaluation grid (:mod:`mixkv.eval.mm_example`), the compressed context
(:mod:`mixkv.integration.compressed_context`) and calibration (:mod:`mixkv.integration.calibration`)
all build their prompts here.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "build_mm_prompt",
    "chat_prompt_parts",
    "has_chat_template",
    "pad_token_id",
    "render_user_turn",
    "tokenizer_of",
    "user_content",
    "visual_placeholder",
]

#: Stands for the question while a template is rendered, to split the prompt around it.
_SENTINEL = "\x00MIXKV-QUESTION\x00"


def tokenizer_of(processor: Any) -> Any:
    """A processor's tokenizer (a tokenizer is its own)."""
    return getattr(processor, "tokenizer", processor)


def pad_token_id(processor: Any) -> int | None:
    """The padding id ``generate`` is given: the tokenizer's, else its end-of-sequence id."""
    tokenizer = tokenizer_of(processor)
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", None)


def has_chat_template(processor: Any) -> bool:
    """Whether the processor or its tokenizer has a chat template."""
    return bool(getattr(processor, "chat_template", None)) or bool(
        getattr(tokenizer_of(processor), "chat_template", None)
    )


def user_content(text: str, *, images: int = 0, videos: int = 0) -> list[dict[str, Any]]:
    """A user turn's content: ``images`` image entries, ``videos`` video entries, then ``text``."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(images)]
    content += [{"type": "video"} for _ in range(videos)]
    return [*content, {"type": "text", "text": text}]


def render_user_turn(processor: Any, content: str | list[dict[str, Any]]) -> str:
    """One user turn rendered as text by the processor's chat template (else its tokenizer's),
    the generation prompt added."""
    owner = processor if getattr(processor, "chat_template", None) else tokenizer_of(processor)
    rendered = owner.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return str(rendered)


def visual_placeholder(processor: Any, kind: str) -> str:
    """The processor's ``image_token`` / ``video_token`` as a prompt placeholder (``kind``)."""
    token = getattr(processor, f"{kind}_token", None)
    if not isinstance(token, str) or not token:
        raise ValueError(
            f"{type(processor).__name__} has no chat template and no {kind}_token attribute; cannot "
            f"place the {kind} in the prompt. Give the processor a chat template."
        )
    tokenizer = tokenizer_of(processor)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if (
        token in ("<|image_pad|>", "<|video_pad|>")
        and "<|vision_start|>" in vocab
        and "<|vision_end|>" in vocab
    ):
        return f"<|vision_start|>{token}<|vision_end|>"  # Qwen-VL processors expect the wrapped pad
    return token


def build_mm_prompt(processor: Any, question: str, kind: str = "image") -> tuple[str, str]:
    """The prompt text for one image (or one video, ``kind="video"``) and a question, and how it
    was built.

    Returns
    -------
    (str, str)
        The prompt (with the processor's image or video placeholder, not yet expanded) and
        ``"chat_template"`` or ``"plain"`` (no chat template: ``<placeholder>\\n<question>``).
    """
    if has_chat_template(processor):
        content = user_content(question, images=int(kind == "image"), videos=int(kind == "video"))
        return render_user_turn(processor, content), "chat_template"
    return f"{visual_placeholder(processor, kind)}\n{question}", "plain"


def chat_prompt_parts(processor: Any, context: str, images: int = 0) -> tuple[str, str]:
    """Split a one-turn chat prompt into its context part and what follows each question.

    The user turn holds ``images`` images, then ``context``, a blank line and the question; the
    prompt of a question is ``head + question + suffix``. Without a chat template (base models)
    ``head`` is the image placeholders, the context and a blank line, and ``suffix`` is empty.

    Parameters
    ----------
    processor
        A tokenizer, or a VLM processor (its chat template, else its tokenizer's).
    context
        The context text (may be empty when the images are the context).
    images
        Number of images at the start of the user turn.

    Returns
    -------
    (str, str)
        ``(head, suffix)``.
    """
    if not has_chat_template(processor):
        placeholder = getattr(processor, "image_token", None) or ""
        if images and not placeholder:
            raise ValueError("This processor has neither a chat template nor an image token.")
        return placeholder * images + (f"{context}\n\n" if context else ""), ""
    text = f"{context}\n\n{_SENTINEL}" if context else _SENTINEL
    content = user_content(text, images=images) if images else text  # text-only templates take a string
    head, found, suffix = render_user_turn(processor, content).partition(_SENTINEL)
    if not found:
        raise ValueError("The chat template altered the message text; build the prompt parts yourself.")
    return head, suffix
