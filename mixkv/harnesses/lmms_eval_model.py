"""lmms-eval model type ``mixkv``: a transformers VLM answering lmms-eval's chat requests under a press.

Install ``pip install "mixkv[lmms-eval]"`` and run the MixKV paper's protocol on your GPU::

    lmms-eval --model mixkv \\
        --model_args pretrained=Qwen/Qwen2-VL-7B-Instruct,press=mixkv-adakv,budget=64 \\
        --tasks docvqa_val,textvqa_val,chartqa,ocrbench --batch_size 1

The ``mixkv`` model type reaches lmms-eval's own command line through the ``lmms_eval.models``
entry point that ``pip install`` registers (:mod:`mixkv.harnesses.lmms_eval_entry`);
``mixkv lmms-eval ...`` does the same without relying on entry points.

Each request is lmms-eval's chat form of the task's document (``doc_to_messages``, or the messages
lmms-eval builds from ``doc_to_visual`` and ``doc_to_text``), rendered with the processor's chat
template and its images, and answered with ``generate`` inside the press: the whole prompt (image
tokens and question) is prefilled, compressed at the end of its prefill and the answer decoded
from the compressed cache (the paper's query-aware protocol). Greedy unless the task asks for a
temperature; the answer is cut at the first ``until`` string (generation runs to
``max_new_tokens`` or the end-of-sequence token: transformers' ``stop_strings`` fails on some
tokenizers). Requests run one at a time, with a progress bar.

Several processes (data parallel): under lmms-eval's own multi-process launch (``accelerate launch
--num_processes N -m lmms_eval --model mixkv ...``, or ``torchrun``) each process loads the model
on its device (``cuda:<local rank>`` for ``device=cuda``) and answers its share of the documents;
lmms-eval gathers the samples and metrics to rank 0. The rank and the number of processes come
from accelerate's state; on the CPU accelerate sees several processes only with
``ACCELERATE_USE_CPU=true`` (gloo), and a launch of several processes that accelerate sees as one
is refused (``ValueError``). lmms-eval pads a rank's requests with marked copies of its last one;
those are not run.

Model arguments: ``pretrained`` (a model directory or hub id in the local cache), ``device``
(default ``cuda`` when available, else ``cpu``), ``device_map`` (default: ``device``), ``dtype``
(default ``float32`` on the CPU, ``bfloat16`` elsewhere), ``attn_implementation`` (``sdpa`` or
``eager``), ``system_prompt`` (text, or a file holding it; replaces a task's system turn),
``answer_prefix`` (the start of every answer: appended after the generation prompt, the answer
continues it; a task or ``--gen_kwargs`` may set ``answer_prefix`` per request),
``trust_remote_code``, plus ``press`` (a name from ``mixkv presses``; default ``mixkv-snapkv``,
``full`` for no press), ``budget`` or ``compression_ratio``, and the press's own options
(``window_size``, ``head_scores=stats.safetensors`` for SparseMM...). Unknown arguments are refused
by name. Log-likelihood requests are refused.

Each ``generate_until`` call logs lmms-eval's throughput metrics plus the compression's
(``mixkv_kept_tokens_per_kv_head``, ``mixkv_kv_fraction``, ``mixkv_context_tokens``,
``mixkv_compressed_prompts``): they land in the results file's ``throughput`` section as
``avg_mixkv_...``. With several processes the compression's statistics are gathered from every
rank when lmms-eval cleans the model up after its requests (every rank does) and logged once, on
rank 0, over all ranks; the tokens and times of the ``throughput`` section stay rank 0's, as for
lmms-eval's own models.

Why not lmms-eval's ``huggingface`` model with a press around it: in lmms-eval 0.7.3 it loads
``AutoModel`` (a VLM without its language-model head: it compares model type names with the config
classes of transformers' auto mappings) and passes ``audios=`` to the processor, which transformers 5
refuses.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from mixkv.harnesses.press_arguments import (
    PressRun,
    attached,
    default_device,
    default_dtype,
    split_press_arguments,
)
from mixkv.integration.chat_prompts import render_chat

try:
    from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
    from lmms_eval.api.model import lmms
    from lmms_eval.models.model_utils.gen_metrics import log_metrics
    from lmms_eval.protocol import ChatMessages
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('mixkv\'s lmms-eval model needs lmms-eval: pip install "mixkv[lmms-eval]"') from exc

__all__ = ["MODEL_ARGUMENTS", "MixKVLMMs"]

#: The model's own arguments (besides the press's).
MODEL_ARGUMENTS = (
    "pretrained",
    "device",
    "device_map",
    "batch_size",
    "dtype",
    "attn_implementation",
    "system_prompt",
    "answer_prefix",
    "trust_remote_code",
    "max_batch_size",
)


class MixKVLMMs(lmms):
    """lmms-eval chat model: a transformers VLM with a mixkv press (see the module documentation).

    Attributes
    ----------
    press
        The press (None for ``press=full``); ``press.last_report`` describes the last prefill.
    press_run
        The press's name and options, and the compression statistics of the requests run so far.
    """

    is_simple = False

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        device_map: str | None = None,
        batch_size: int | str = 1,
        dtype: str | None = None,
        attn_implementation: str = "sdpa",
        system_prompt: str | None = None,
        answer_prefix: str = "",
        trust_remote_code: bool = False,
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.press_run, _ = split_press_arguments(kwargs, MODEL_ARGUMENTS)
        self.press = self.press_run.press
        if int(batch_size) != 1:
            raise ValueError(
                "lmms-eval's model type mixkv answers one request at a time: use --batch_size 1."
            )
        super().__init__()
        device = self._join_data_parallel(device or default_device())
        self._ranks_run: PressRun | None = None  # this process's share, when there are several
        placement = device_map or device
        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        is_vlm = type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
        model_class = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
        self.model = model_class.from_pretrained(
            pretrained,
            dtype=dtype or default_dtype(placement),
            device_map=placement,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        ).eval()
        self._device = self.model.device
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self.system_prompt = system_prompt.replace("\\n", "\n") if system_prompt else None
        self.answer_prefix = _text(answer_prefix)

    def _join_data_parallel(self, device: str) -> str:
        """Take the rank and the number of processes from accelerate's state (see the module
        documentation) and return this process's device: accelerate's (``cuda:<local rank>``) for
        a device of its type given without an index, else ``device``."""
        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            self.accelerator = accelerator
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
            given = torch.device(device)
            return (
                str(accelerator.device)
                if given.type == accelerator.device.type and given.index is None
                else device
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1:
            raise ValueError(
                f"This process is one of {launched} (WORLD_SIZE={launched}) but accelerate sees a single "
                "process, so lmms-eval cannot split the documents over them. On the CPU, accelerate runs "
                "several processes only with ACCELERATE_USE_CPU=true: launch with "
                f"`ACCELERATE_USE_CPU=true accelerate launch --num_processes {launched} -m lmms_eval --model mixkv ...` "
                "(or set it for torchrun)."
            )
        return device

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go (lmms-eval puts its request counts there to gather them)."""
        return self._device

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise ValueError("lmms-eval's model type mixkv answers generation tasks only (no log-likelihood).")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise ValueError("lmms-eval's model type mixkv answers single-round generation tasks only.")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results = []
        run = self.press_run.fresh()
        generated_tokens = 0
        start = time.perf_counter()
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="mixkv responding")
        with attached(self.press, self.model):
            for request in requests:
                if isinstance(request.metadata, dict) and request.metadata.get("__padding_only__"):
                    results.append(GenerationResult(text="", token_counts=TokenCounts()))
                    progress.update(1)
                    continue
                _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
                chat = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
                run.forget_report()
                text, counts = self._answer(chat, dict(gen_kwargs))
                run.record()
                generated_tokens += counts.output_tokens or 0
                results.append(GenerationResult(text=text, token_counts=counts))
                self.cache_hook.add_partial("generate_until", (request.args[0], gen_kwargs), text)
                progress.update(1)
        progress.close()
        self.press_run.merge(run)
        elapsed = time.perf_counter() - start
        metrics = {f"mixkv_{k}": v for k, v in _short_names(run.statistics()).items()}
        if self.world_size > 1:  # logged over every rank by clean()
            self._ranks_run = self._ranks_run or self.press_run.fresh()
            self._ranks_run.merge(run)
            metrics = {}
        log_metrics(
            total_elapsed_time=elapsed,
            total_gen_tokens=generated_tokens,
            avg_speed=generated_tokens / elapsed if elapsed > 0 else 0.0,
            additional_metrics={**metrics, "total_requests": len(requests)} if requests else None,
        )
        return results

    def clean(self) -> None:
        """lmms-eval's clean-up after the requests (every rank calls it); with several processes,
        first log the compression statistics of every rank's requests, on rank 0."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            own = (self._ranks_run or self.press_run.fresh()).totals()
            gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
            torch.distributed.gather_object(own, gathered, dst=0)
            self._ranks_run = None
            if gathered is not None:
                merged = self.press_run.fresh()
                for totals in gathered:
                    merged.add_totals(totals)
                metrics = {f"mixkv_{k}": v for k, v in _short_names(merged.statistics()).items()}
                if metrics:
                    log_metrics(
                        total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=metrics
                    )
        super().clean()

    def _answer(self, chat: ChatMessages, gen_kwargs: dict[str, Any]) -> tuple[str, TokenCounts]:
        """The answer to one chat and its token counts (prompt and generated)."""
        images, videos, _ = chat.extract_media()
        if videos:
            raise ValueError("lmms-eval's model type mixkv takes images, not videos.")
        messages = chat.to_hf_messages()
        if self.system_prompt:
            if messages and messages[0]["role"] == "system":
                messages = messages[1:]
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        prefix = gen_kwargs.pop("answer_prefix", None)
        prompt = render_chat(
            self.processor, messages, answer_prefix=self.answer_prefix if prefix is None else _text(prefix)
        )
        inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt").to(
            self.model.device
        )
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        options: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.pop("max_new_tokens", 128)),
            "do_sample": temperature > 0,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if temperature > 0:
            options["temperature"] = temperature
        with torch.inference_mode():
            out = self.model.generate(**inputs, **options)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        new_tokens = out[0, prompt_tokens:]
        text = str(self.tokenizer.decode(new_tokens, skip_special_tokens=True))
        for stop in until:
            text = text.split(stop)[0]
        return text, TokenCounts(input_tokens=prompt_tokens, output_tokens=int(new_tokens.numel()))


def _text(value: Any) -> str:
    """A model argument meant as text (lmms-eval turns ``7`` or ``true`` into numbers and booleans)."""
    return "" if value is None else str(value)


def _short_names(statistics: dict[str, float]) -> dict[str, float]:
    """:meth:`PressRun.statistics` under the metric names of the results' throughput section."""
    names = {
        "mean_kept_tokens_per_kv_head": "kept_tokens_per_kv_head",
        "kv_fraction": "kv_fraction",
        "mean_context_tokens": "context_tokens",
        "compressed_prompts": "compressed_prompts",
    }
    return {names[k]: v for k, v in statistics.items()}
