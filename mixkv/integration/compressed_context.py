"""Compress once, ask many: a context prefilled and compressed once, questions answered from copies.

This is the query-agnostic protocol kvpress users know (a document, or images, compressed before
any question is known), as a small class rather than a ``transformers`` pipeline: transformers 5's
pipelines own tokenisation, batching and the cache of each call, while here one cache must outlive
the calls and stay inside the press's ``with`` block. Usage::

    from mixkv import CompressedContext, MixKVPress

    press = MixKVPress(budget=128, base="adakv")
    with CompressedContext.from_chat(model, processor, press, document, images=[page]) as ctx:
        for question in questions:
            print(ctx.ask(question, max_new_tokens=32))
        print(ctx.ask("Who signed it?", answer_prefix="It was signed by"))  # the answer continues the prefix
        print(press.last_report.summary())  # the context's compression

Every question continues from its own copy of the compressed cache (:meth:`PressSession.fork`), so
answers do not depend on the order of the questions or on each other.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from transformers import DynamicCache

from mixkv.integration.chat_prompts import chat_prompt_parts, pad_token_id, tokenizer_of
from mixkv.integration.decoder_layout import (
    cache_argument,
    generation_state,
    prefill,
    restore_generation_state,
)
from mixkv.integration.session import PressSession
from mixkv.presses.base import BasePress

__all__ = ["CompressedContext"]


class CompressedContext:
    """A context prefilled and compressed once; each question is answered from a copy of its cache.

    Use as a context manager: entering attaches the press and prefills the context (that is when
    it is compressed); :meth:`ask` / :meth:`generate` may then be called any number of times;
    leaving detaches the press (compressed caches are only usable while it is attached).

    Parameters
    ----------
    model
        A supported causal LM or VLM (``mixkv.integration.SUPPORTED_MODEL_TYPES``).
    press
        A mixkv press, or None for the full cache.
    context
        The context's token ids ``(1, N)`` or the processor's output for it (``input_ids`` plus
        ``attention_mask``, ``pixel_values``, ``image_grid_thw``... as the model takes them).
        Batch size 1.
    processor
        Tokenizer or processor used by :meth:`ask` to encode questions and decode answers.
    question_suffix
        Text appended to every question (the chat template's end of turn and generation prompt,
        see :func:`~mixkv.integration.chat_prompts.chat_prompt_parts`).

    Notes
    -----
    Reference checks (``tests/test_compressed_context.py``): the answer to each question equals a
    fresh compression of the context followed by that question alone; with the full cache it
    equals ``model.generate`` on the whole prompt; with a budget not below the context it equals
    the full cache.
    """

    def __init__(
        self,
        model: Any,
        press: BasePress | None,
        context: torch.Tensor | Mapping[str, Any],
        *,
        processor: Any = None,
        question_suffix: str = "",
    ) -> None:
        if press is not None and not isinstance(press, BasePress):
            raise ValueError(
                f"CompressedContext takes a mixkv press (mixkv.presses.from_name), not {type(press).__name__}"
            )
        inputs = {"input_ids": context} if isinstance(context, torch.Tensor) else dict(context)
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise ValueError("context must hold input_ids of shape (1, N): one sequence, at least one token")
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and not bool(mask.all()):
            raise ValueError(
                "context must not be padded (attention_mask has zeros); pass one unpadded sequence"
            )
        self.model = model
        self.press = press
        self.processor = processor
        self.question_suffix = question_suffix
        self._inputs = inputs
        self._context_ids = ids
        self._manager: contextlib.AbstractContextManager[Any] | None = None
        self._session: PressSession | None = None
        self._cache: Any = None
        self._generation_state: dict[str, Any] = {}

    @classmethod
    def from_chat(
        cls,
        model: Any,
        processor: Any,
        press: BasePress | None,
        context: str,
        *,
        images: Sequence[Any] = (),
    ) -> CompressedContext:
        """A context from text and images in one chat user turn (see
        :func:`~mixkv.integration.chat_prompts.chat_prompt_parts`); questions are then asked as plain
        strings with :meth:`ask`."""
        head, suffix = chat_prompt_parts(processor, context, len(images))
        if images:
            encoded = processor(text=[head], images=list(images), return_tensors="pt")
        else:
            encoded = tokenizer_of(processor)(head, add_special_tokens=False, return_tensors="pt")
        inputs = {k: v.to(model.device) for k, v in encoded.items() if isinstance(v, torch.Tensor)}
        return cls(model, press, inputs, processor=processor, question_suffix=suffix)

    # -- context management ---------------------------------------------------------------------
    def __enter__(self) -> CompressedContext:
        if self._manager is not None:
            raise RuntimeError("this CompressedContext is already open")
        manager = self.press(self.model) if self.press is not None else contextlib.nullcontext()
        session = manager.__enter__()
        self._manager = manager
        try:
            self._session = session
            cache = DynamicCache(config=self.model.config)
            extra = {k: v for k, v in self._inputs.items() if k != "input_ids"}
            with torch.inference_mode():
                prefill(self.model, self._context_ids, cache, **extra)
            self._cache = cache
            self._generation_state = generation_state(self.model)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Detach the press and free the compressed cache (what leaving the ``with`` block does)."""
        manager, self._manager = self._manager, None
        self._cache = None
        self._session = None
        self._generation_state.clear()
        if manager is not None:
            manager.__exit__(None, None, None)

    # -- questions --------------------------------------------------------------------------------
    @property
    def context_tokens(self) -> int:
        """Number of tokens in the context."""
        return int(self._context_ids.shape[1])

    def generate(
        self, question_ids: torch.Tensor | Iterable[int], *, max_new_tokens: int = 32, **generate_kwargs: Any
    ) -> torch.Tensor:
        """Greedy answer token ids ``(T,)`` to a question given as token ids, from a fresh copy of
        the compressed context. ``generate_kwargs`` go to ``model.generate``."""
        if self._manager is None:
            raise RuntimeError("use the CompressedContext inside `with CompressedContext(...) as ctx:`")
        question = torch.as_tensor(
            question_ids if isinstance(question_ids, torch.Tensor) else list(question_ids), dtype=torch.long
        ).reshape(1, -1)
        if question.shape[1] < 1:
            raise ValueError("the question must hold at least one token")
        ids = torch.cat([self._context_ids, question.to(self._context_ids.device)], dim=1)
        cache = self._session.fork(self._cache) if self._session is not None else copy.deepcopy(self._cache)
        restore_generation_state(self.model, self._generation_state)
        options: dict[str, Any] = {"do_sample": False, **generate_kwargs}
        pad = pad_token_id(self.processor)
        if pad is not None:
            options.setdefault("pad_token_id", pad)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **{cache_argument(self.model): cache},
                max_new_tokens=max_new_tokens,
                **options,
            )
        return out[0, ids.shape[1] :]

    def ask(
        self, question: str, *, max_new_tokens: int = 32, answer_prefix: str = "", **generate_kwargs: Any
    ) -> str:
        """The decoded greedy answer to ``question`` (``question_suffix`` appended).

        ``answer_prefix`` is placed after the question's suffix (the chat template's generation
        prompt), so the answer continues it: the start of the assistant's message, such as
        ``"Ada Moss:"``. The returned text is what the model wrote after the prefix."""
        if self.processor is None:
            raise ValueError("ask() needs the processor or tokenizer: pass processor= (or use from_chat)")
        tokenizer = tokenizer_of(self.processor)
        ids = tokenizer(question + self.question_suffix + answer_prefix, add_special_tokens=False)[
            "input_ids"
        ]
        answer = self.generate(ids, max_new_tokens=max_new_tokens, **generate_kwargs)
        return str(tokenizer.decode(answer, skip_special_tokens=True)).strip()
