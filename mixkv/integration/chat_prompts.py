"""Chat prompts of a model's processor: one user turn with images, videos and text.

A vision-language model's prompt is the processor's chat template applied to one user turn whose
content lists the visual entries, then the text (the processor expands each placeholder into the
image's or video's tokens). Without a chat template the prompt is built from the processor's
placeholder tokens. The evaluation grid (:mod:`mixkv.eval.mm_example`), the compressed context
(:mod:`mixkv.integration.compressed_context`) and calibration (:mod:`mixkv.integration.calibration`)
all build their prompts here; the harness models render whole conversations (a system turn
included) with :func:`render_chat`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "build_mm_prompt",
    "chat_prompt_parts",
    "has_chat_template",
    "pad_token_id",
    "render_chat",
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


def render_chat(processor: Any, messages: list[dict[str, Any]], *, answer_prefix: str = "") -> str:
    """A conversation rendered as text by the processor's chat template (else its tokenizer's), the
    generation prompt added, then ``answer_prefix`` (so that the answer continues it).

    Chat templates disagree on the form of a text-only turn's content: some concatenate it as a
    string (``'<|im_start|>system\\n' + message['content']``: a list of parts fails), others only read
    its ``{"type": "text"}`` parts (a string is silently dropped). System turns whose content is
    text only are therefore tried as a string first, then as a list of text parts, and the first
    rendering that keeps every system text is used; failing that, every text-only turn is tried as a
    string. A conversation without a system turn is rendered as given first (then with its text-only
    turns as strings).

    Parameters
    ----------
    processor
        A tokenizer or a VLM processor.
    messages
        Hugging Face chat messages (``{"role": ..., "content": str | list of parts}``).
    answer_prefix
        Text appended after the generation prompt: the start of the assistant's answer.

    Raises
    ------
    ValueError
        When the template renders no form of the conversation, or drops its system prompt.
    """
    owner = processor if getattr(processor, "chat_template", None) else tokenizer_of(processor)
    system_texts = [_text_of(m["content"]) for m in messages if m.get("role") == "system"]
    candidates = []
    if system_texts:
        candidates.append(_with_string_content(messages, roles=("system",)))
    candidates.append(_with_list_content(messages, roles=("system",)))
    candidates.append(_with_string_content(messages, roles=None))
    errors: list[Exception] = []
    dropped = False
    for candidate in candidates:
        try:
            rendered = str(owner.apply_chat_template(candidate, add_generation_prompt=True, tokenize=False))
        except Exception as exc:  # jinja2's errors, TypeError from string concatenation...
            errors.append(exc)
            continue
        if all(text.strip() in rendered for text in system_texts if text is not None):
            return rendered + answer_prefix
        dropped = True
    if dropped:
        raise ValueError(
            "The chat template drops the system prompt (no form of the system turn kept its text); "
            "put the instruction in the user's text instead."
        )
    raise ValueError(f"The chat template cannot render this conversation: {errors[0]}") from errors[0]


def _text_of(content: Any) -> str | None:
    """A turn's text when its content is text only (a string or text parts), else None."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text" for c in content):
        return "".join(str(c.get("text", "")) for c in content)
    return None


def _with_string_content(
    messages: list[dict[str, Any]], roles: tuple[str, ...] | None
) -> list[dict[str, Any]]:
    """The messages with the text-only turns of ``roles`` (every role: None) as string content."""
    out = []
    for message in messages:
        text = _text_of(message.get("content"))
        if text is not None and (roles is None or message.get("role") in roles):
            message = {**message, "content": text}
        out.append(message)
    return out


def _with_list_content(messages: list[dict[str, Any]], roles: tuple[str, ...]) -> list[dict[str, Any]]:
    """The messages with the string content of ``roles`` as one text part."""
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}]}
        if m.get("role") in roles and isinstance(m.get("content"), str)
        else m
        for m in messages
    ]


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


def build_mm_prompt(processor: Any, question: str, kind: str = "image", count: int = 1) -> tuple[str, str]:
    """The prompt text for ``count`` images (or videos, ``kind="video"``) and a question, and how
    it was built.

    Returns
    -------
    (str, str)
        The prompt (with the processor's image or video placeholders, not yet expanded) and
        ``"chat_template"`` or ``"plain"`` (no chat template: ``<placeholder>...\\n<question>``).

    Raises
    ------
    ValueError
        If ``count < 1``.
    """
    if count < 1:
        raise ValueError(f"build_mm_prompt: count must be at least 1, got {count}.")
    if has_chat_template(processor):
        content = user_content(
            question, images=count * int(kind == "image"), videos=count * int(kind == "video")
        )
        return render_user_turn(processor, content), "chat_template"
    return f"{visual_placeholder(processor, kind) * count}\n{question}", "plain"


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
