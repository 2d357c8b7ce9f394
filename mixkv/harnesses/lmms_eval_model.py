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
tokenizers). Requests run one at a
time, in one process.

Model arguments: ``pretrained`` (a model directory or hub id in the local cache), ``device``,
``device_map``, ``dtype`` (default ``bfloat16``), ``attn_implementation`` (``sdpa`` or ``eager``),
``system_prompt``, ``trust_remote_code``, plus ``press`` (a name from ``mixkv presses``; default
``mixkv-snapkv``, ``full`` for no press), ``budget`` or ``compression_ratio``, and the press's own
options (``window_size``, ``head_scores=stats.safetensors`` for SparseMM...). Log-likelihood
requests are refused.

Why not lmms-eval's ``huggingface`` model with a press around it: in lmms-eval 0.7.3 it loads
``AutoModel`` (a VLM without its language-model head: it compares model type names with the config
classes of transformers' auto mappings) and passes ``audios=`` to the processor, which transformers 5
refuses.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from mixkv.harnesses.press_arguments import attached, split_press_arguments

try:
    from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
    from lmms_eval.api.model import lmms
    from lmms_eval.protocol import ChatMessages
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('mixkv\'s lmms-eval model needs lmms-eval: pip install "mixkv[lmms-eval]"') from exc

__all__ = ["MixKVLMMs"]


class MixKVLMMs(lmms):
    """lmms-eval chat model: a transformers VLM with a mixkv press (see the module documentation).

    Attributes
    ----------
    press
        The press (None for ``press=full``); ``press.last_report`` describes the last prefill.
    """

    is_simple = False

    def __init__(
        self,
        pretrained: str,
        device: str = "cuda",
        device_map: str | None = None,
        batch_size: int | str = 1,
        dtype: str = "bfloat16",
        attn_implementation: str = "sdpa",
        system_prompt: str | None = None,
        trust_remote_code: bool = False,
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.press, unknown = split_press_arguments(kwargs)
        if unknown:
            raise ValueError(f"Unknown model argument(s) {sorted(unknown)} for lmms-eval's model type mixkv.")
        if int(batch_size) != 1:
            raise ValueError(
                "lmms-eval's model type mixkv answers one request at a time: use --batch_size 1."
            )
        super().__init__()
        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        is_vlm = type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
        model_class = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
        self.model = model_class.from_pretrained(
            pretrained,
            dtype=dtype,
            device_map=device_map or device,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        ).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        self.system_prompt = system_prompt.replace("\\n", "\n") if system_prompt else None

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise ValueError("lmms-eval's model type mixkv answers generation tasks only (no log-likelihood).")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise ValueError("lmms-eval's model type mixkv answers single-round generation tasks only.")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results = []
        with attached(self.press, self.model):
            for request in requests:
                _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
                messages = doc_to_messages(self.task_dict[task][split][doc_id])
                if self.system_prompt:
                    messages = [
                        {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
                        *messages,
                    ]
                text, generated = self._answer(ChatMessages(messages=messages), dict(gen_kwargs))
                results.append(GenerationResult(text=text, token_counts=TokenCounts(output_tokens=generated)))
                self.cache_hook.add_partial("generate_until", (request.args[0], gen_kwargs), text)
        return results

    def _answer(self, chat: ChatMessages, gen_kwargs: dict[str, Any]) -> tuple[str, int]:
        """The answer to one chat and its number of generated tokens."""
        images, videos, _ = chat.extract_media()
        if videos:
            raise ValueError("lmms-eval's model type mixkv takes images, not videos.")
        prompt = self.processor.apply_chat_template(
            chat.to_hf_messages(), add_generation_prompt=True, tokenize=False
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
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        text = str(self.tokenizer.decode(new_tokens, skip_special_tokens=True))
        for stop in until:
            text = text.split(stop)[0]
        return text, int(new_tokens.numel())
