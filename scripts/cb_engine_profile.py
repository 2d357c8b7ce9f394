"""Where transformers' ``generate_batch`` spends its time on CPU: its default sizing against a sized cache.

Usage: ``OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/cb_engine_profile.py``. Three short chat
prompts on SmolLM2-135M-Instruct, 16 greedy new tokens each: three plain ``generate`` calls (after
a warm-up round), ``generate_batch`` with a cache sized for the job (64 pages of 16 tokens, 256
tokens per step), and ``generate_batch`` with transformers' default configuration under cProfile
(the 35 most expensive calls by cumulative time are printed).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from mixkv.model_loading import load_model


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load_model("smollm2")
    questions = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about rain."]
    prompts = [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for q in questions
    ]
    print("prompt lengths", [len(p) for p in prompts], flush=True)
    gen = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=-1)

    def timed(label: str, run: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = run()
        print(f"{label}: {time.perf_counter() - start:.2f} s", flush=True)
        return out

    def plain() -> list[list[int]]:
        with torch.no_grad():
            return [
                model.generate(
                    torch.tensor([p]),
                    attention_mask=torch.ones(1, len(p), dtype=torch.long),
                    generation_config=gen,
                )[0, len(p) :].tolist()
                for p in prompts
            ]

    def batch(config: ContinuousBatchingConfig | None) -> list[list[int]]:
        with torch.no_grad():
            out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=config)
        return [out[rid].generated_tokens for rid in sorted(out, key=lambda rid: int(rid.split("_")[-1]))]

    def sized() -> ContinuousBatchingConfig:
        return ContinuousBatchingConfig(
            page_size=16, num_blocks=64, max_batch_tokens=256, use_async_batching=False
        )

    timed("3 x generate (warm-up)", plain)
    reference = timed("3 x generate", plain)
    timed("generate_batch, sized (1024-token cache, 256 tokens per step), first", lambda: batch(sized()))
    answers = timed("generate_batch, sized, second", lambda: batch(sized()))
    print("sized generate_batch answers equal generate's:", answers == reference, flush=True)
    profile = cProfile.Profile()
    profile.enable()
    timed("generate_batch, transformers' default configuration", lambda: batch(None))
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(35)
    print(text.getvalue())


if __name__ == "__main__":
    main()
