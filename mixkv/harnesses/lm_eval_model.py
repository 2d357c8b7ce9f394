"""lm-evaluation-harness model type ``mixkv``: the harness's own Hugging Face model with a press.

Install ``pip install "mixkv[lm-eval]"`` and run::

    mixkv lm-eval --model mixkv \\
        --model_args pretrained=/models/llama-3.1-8b-instruct,press=mixkv-adakv,budget=128 \\
        --tasks ruler --batch_size 1

``mixkv lm-eval`` is the harness's own command line (every argument is passed through) with the
``mixkv`` model type registered. From Python, ``import mixkv.harnesses.lm_eval_model`` registers it
for ``lm_eval.simple_evaluate(model="mixkv", ...)``.

Model arguments: everything the harness's ``hf`` model takes, plus ``press`` (a name from
``mixkv presses``; default ``mixkv-snapkv``, ``full`` for no press), ``budget`` or
``compression_ratio``, the press's own options (``window_size=16``, ``floor_ratio=0.3``,
``redundancy=stats.safetensors``...) and ``answer_prefix`` (text appended to every request's
context, after the chat template's generation prompt with ``--apply_chat_template``: generated
and scored answers continue it; a task's ``generation_kwargs`` or ``--gen_kwargs`` may set
``answer_prefix`` for generation requests). An argument that is neither the ``hf`` model's nor the
press's is refused by name, with the press's options listed. Without ``device`` the model runs on
``cuda`` when available, else on the CPU; on the CPU the default ``dtype`` is ``float32`` (the
``hf`` model's ``auto`` would keep a bfloat16 checkpoint in bfloat16, several times slower there).

The results file's ``config`` holds ``mixkv``: the press, its options and, over the prompts
prefilled under the press, the mean context tokens, the mean kept tokens per KV head and the KV
fraction (cache bytes kept over the full cache's).

Several processes (data parallel)
---------------------------------
Under the harness's own multi-process launch (``accelerate launch --num_processes N -m mixkv
lm-eval run ...``, or ``torchrun``) each process loads the model and evaluates its share of the
documents; the harness gathers the samples and metrics to rank 0, which writes the results. The
rank and the number of processes come from accelerate's state, on GPUs and on the CPU (the ``hf``
model splits the documents only over several GPUs; on the CPU every process would evaluate every
document). The harness pads a rank's requests with copies of its last one so that ranks run equal
counts; those copies are answered without being run again, so the statistics count each prompt
once, and rank 0's results hold the statistics of every rank (gathered with the samples). On the
CPU, accelerate sees several processes only with ``ACCELERATE_USE_CPU=true`` (gloo); a launch of
several processes that accelerate sees as one is refused (``ValueError``).

How requests run under the press
--------------------------------
``generate_until``
    ``generate`` inside the press: each prompt is prefilled, compressed at the end of its prefill
    (left-padded batches included), and the answer is decoded from the compressed cache.
``loglikelihood`` (multiple choice...)
    Scored honestly under compression: the context without its last token is prefilled and
    compressed, then the last context token and the continuation run through the compressed cache,
    so every continuation token is predicted by attention over the compressed context. (Running
    context and continuation in one forward, as the ``hf`` model does, would score them with the
    full cache: compression happens only at the end of a prefill.) A context is compressed once
    and each of its continuations is scored from a copy of the compressed cache. Requests run one
    at a time, with a progress bar.
``loglikelihood_rolling`` (perplexity)
    Refused: every token of the document is both context and target, so there is no context to
    compress before scoring; use ``press=full`` for these tasks.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache

from mixkv.harnesses.press_arguments import (
    RunTotals,
    attached,
    default_device,
    split_press_arguments,
    unknown_arguments_error,
)
from mixkv.integration.decoder_layout import cache_argument, prefill

try:
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'mixkv\'s lm-evaluation-harness model needs the harness: pip install "mixkv[lm-eval]"'
    ) from exc

__all__ = ["MixKVHarnessLM"]

MODEL_NAME = "mixkv"
_HF_ARGUMENTS = tuple(p for p in inspect.signature(HFLM.__init__).parameters if p not in ("self", "kwargs"))


@register_model(MODEL_NAME)
class MixKVHarnessLM(HFLM):
    """The harness's ``hf`` model with a mixkv press (see the module documentation).

    Attributes
    ----------
    press
        The press (None for ``press=full``); ``press.last_report`` describes the last prefill.
    press_run
        The press's name and options, and the compression statistics of the prompts run so far
        (what :meth:`get_model_info` reports under ``mixkv``).
    answer_prefix
        Appended to every request's context.
    """

    def __init__(self, answer_prefix: str = "", **kwargs: Any) -> None:
        self.press_run, hf_kwargs = split_press_arguments(kwargs, _HF_ARGUMENTS, strict=False)
        self.press = self.press_run.press
        self.answer_prefix = "" if answer_prefix is None else str(answer_prefix)
        if hf_kwargs.get("device") is None:
            hf_kwargs["device"] = default_device()
        device = str(hf_kwargs["device"])
        on_cpu = device.startswith("cpu") or (device.startswith("cuda") and not torch.cuda.is_available())
        if hf_kwargs.get("dtype") is None and on_cpu and isinstance(hf_kwargs.get("pretrained"), str):
            hf_kwargs["dtype"] = "float32"
        try:
            super().__init__(**hf_kwargs)
        except TypeError as exc:
            # The hf model hands unknown arguments to from_pretrained, whose model constructor fails.
            found = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
            if found and found.group(1) in hf_kwargs and found.group(1) not in _HF_ARGUMENTS:
                raise unknown_arguments_error(self.press_run.name, [found.group(1)]) from exc
            raise
        if self.backend != "causal":
            raise ValueError("mixkv compresses decoder-only models; this model is a seq2seq one.")
        self._other_ranks: dict[int, RunTotals] = {}
        self._join_data_parallel(tensor_parallel=hf_kwargs.get("tp_plan") is not None)

    def _join_data_parallel(self, tensor_parallel: bool) -> None:
        """Take the rank and the number of processes from accelerate's state (see the module
        documentation); refuse a multi-process launch that accelerate sees as one process."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
            return
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and not tensor_parallel:
            raise ValueError(
                f"This process is one of {launched} (WORLD_SIZE={launched}) but accelerate sees a single "
                "process, so every process would evaluate every document. On the CPU, accelerate runs "
                "several processes only with ACCELERATE_USE_CPU=true: launch with "
                f"`ACCELERATE_USE_CPU=true accelerate launch --num_processes {launched} -m mixkv lm-eval run ...` "
                "(or set it for torchrun)."
            )

    def get_model_info(self) -> dict[str, Any]:
        """The ``hf`` model's information plus ``mixkv``: the press, its options and its statistics
        (on rank 0 of several processes: over every rank)."""
        run = self.press_run.fresh()
        run.merge(self.press_run)
        for totals in self._other_ranks.values():
            run.add_totals(totals)
        return {**super().get_model_info(), "mixkv": run.info()}

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """The harness's gather of samples and metrics to rank ``dst``, which also receives every
        rank's press statistics (the latest ones: the harness gathers more than once)."""
        if self.world_size <= 1:
            return list(super().gather_object(obj, dst))
        gathered = super().gather_object((obj, self.press_run.totals()), dst)
        if gathered is None:
            return None
        for rank, (_, totals) in enumerate(gathered):
            if rank != self.rank:
                self._other_ranks[rank] = totals
        return [sent for sent, _ in gathered]

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        requests, padding = _without_padding(requests) if self.world_size > 1 else (requests, 0)
        answers = self._generate_until(requests, disable_tqdm)
        return answers + answers[-1:] * padding

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        requests, padding = _without_padding(requests) if self.world_size > 1 else (requests, 0)
        answers = self._loglikelihood(requests, disable_tqdm)
        return answers + answers[-1:] * padding

    def _generate_until(self, requests: list[Instance], disable_tqdm: bool) -> list[str]:
        prefixed = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs)
            prefix = gen_kwargs.pop("answer_prefix", None)
            prefix = self.answer_prefix if prefix is None else str(prefix)
            prefixed.append(dataclasses.replace(request, arguments=(context + prefix, gen_kwargs)))
        return list(super().generate_until(prefixed, disable_tqdm=disable_tqdm))

    def _loglikelihood(self, requests: list[Instance], disable_tqdm: bool) -> list[tuple[float, bool]]:
        if self.answer_prefix:
            requests = [
                dataclasses.replace(r, arguments=(r.args[0] + self.answer_prefix, *r.args[1:]))
                for r in requests
            ]
        return list(super().loglikelihood(requests, disable_tqdm=disable_tqdm))

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> Any:
        with attached(self.press, self.model):
            self.press_run.forget_report()
            out = super()._model_generate(context, max_length, stop, **kwargs)
            self.press_run.record()
            return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        if self.press is not None:
            raise ValueError(
                "loglikelihood_rolling (perplexity) tasks score every token of a document, so there is no "
                "context to compress first; run them with press=full."
            )
        return list(super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm))

    def _loglikelihood_tokens(
        self,
        requests: Sequence[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if self.press is None:
            return list(super()._loglikelihood_tokens(requests, disable_tqdm, override_bs))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Requests grouped by the part that is compressed: one compression per context.
        groups: dict[tuple[int, ...], list[tuple[int, list[int], list[int]]]] = {}
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            tokens = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            head = tokens[: len(tokens) - len(continuation_enc) - 1]
            tail = tokens[len(head) : -1]
            groups.setdefault(tuple(head), []).append((i, tail, continuation_enc))
        progress = tqdm(
            total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Scoring under the press"
        )
        for compressed, members in groups.items():
            with torch.inference_mode(), attached(self.press, self.model) as session:
                cache = DynamicCache(config=self.model.config)
                if compressed:
                    self.press_run.forget_report()
                    prefill(self.model, torch.tensor([compressed], device=self.device), cache)
                    self.press_run.record()
                for i, tail, continuation in members:
                    copy = (
                        session.fork(cache)
                        if session is not None and compressed
                        else DynamicCache(config=self.model.config)
                    )
                    ids = torch.tensor([tail], device=self.device)
                    logits = self.model(input_ids=ids, **{cache_argument(self.model): copy}).logits[0]
                    scored = logits[-len(continuation) :].float().log_softmax(-1)
                    target = torch.tensor(continuation, device=scored.device)
                    logprob = float(scored.gather(-1, target[:, None]).sum())
                    results[i] = (logprob, bool((scored.argmax(-1) == target).all()))
                    progress.update(1)
        progress.close()
        for (request_str, _, _), answer in zip(requests, results, strict=True):
            if request_str is not None and answer is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return [answer for answer in results if answer is not None]


def _without_padding(requests: list[Instance]) -> tuple[list[Instance], int]:
    """The requests without the copies the harness appends to give every rank as many requests
    (``repeats`` copies of the last request, once per missing request), and how many there were.

    The harness sends each request ``repeats`` times in a row; its padding repeats the last request
    object again, so a last run of the same object longer than its ``repeats`` is padding.
    """
    if not requests:
        return requests, 0
    last = requests[-1]
    run = 0
    while run < len(requests) and requests[-1 - run] is last:
        run += 1
    padding = run - max(int(getattr(last, "repeats", 1) or 1), 1)
    if padding <= 0:
        return requests, 0
    return requests[:-padding], padding
