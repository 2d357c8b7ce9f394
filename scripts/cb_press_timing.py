"""Wall time and peak pages of continuous batching with and without a press, against sequential generate.

Usage: ``OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/cb_press_timing.py [--requests 16]
[--new-tokens 32] [--budget 64] [--model smollm2]``. Prompts are haystack sentences of 120 to 400
tokens; every run is greedy. Prints one line per run and whether each CB run's answers equal the
sequential ones under the same press.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

import mixkv
from mixkv.eval.haystack import stdlib_sentences
from mixkv.integration.continuous_batching import PressBatchingManager
from mixkv.model_loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    sentences = list(stdlib_sentences())
    prompts = []
    for i in range(args.requests):
        target = 120 + (i * 280) // max(1, args.requests - 1)
        text, j = "", i * 7
        while len(tok(text)["input_ids"]) < target:
            text += sentences[j % len(sentences)] + " "
            j += 1
        messages = [{"role": "user", "content": text + "\nSummarise the text above in one sentence."}]
        prompts.append(list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)))
    lengths = [len(p) for p in prompts]
    print(f"{args.requests} prompts of {min(lengths)}-{max(lengths)} tokens ({sum(lengths)} in all), {args.new_tokens} new tokens")
    press = mixkv.SnapKVPress(budget=args.budget)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1)

    def sequential(p: mixkv.BasePress | None) -> list[list[int]]:
        out = []
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([prompt])
                if p is None:
                    seq = model.generate(ids, generation_config=gen)
                else:
                    with p(model):
                        seq = model.generate(ids, generation_config=gen)
                out.append(seq[0, len(prompt) :].tolist())
        return out

    def batched(p: mixkv.BasePress | None) -> tuple[list[list[int]], int, int]:
        cache_tokens = sum(lengths) + args.requests * args.new_tokens
        config = ContinuousBatchingConfig(
            page_size=args.page_size, num_blocks=-(-cache_tokens // args.page_size), max_batch_tokens=512
        )
        peak = [0]

        def note(manager: PressBatchingManager) -> None:
            peak[0] = max(peak[0], manager.page_usage().in_use)

        manager = PressBatchingManager(model, press=p, generation_config=gen, batching_config=config)
        manager.add_step_callback(note)
        results = {}
        with torch.no_grad(), manager:
            ids = [manager.add_request(prompt, max_new_tokens=args.new_tokens) for prompt in prompts]
            while len(results) < len(ids):
                result = manager.get_result(timeout=60)
                assert result is not None
                if result.is_finished():
                    results[result.request_id] = result.generated_tokens
            total = manager.page_usage().total
        return [results[rid] for rid in ids], peak[0], total

    reference = {}
    for name, p in (("full", None), (f"snapkv-{args.budget}", press)):
        start = time.perf_counter()
        reference[name] = sequential(p)
        print(f"sequential generate, {name}: {time.perf_counter() - start:.2f} s")
    for name, p in (("full", None), (f"snapkv-{args.budget}", press)):
        start = time.perf_counter()
        outputs, peak, total = batched(p)
        seconds = time.perf_counter() - start
        same = sum(a == b for a, b in zip(outputs, reference[name], strict=True))
        print(
            f"continuous batching, {name}: {seconds:.2f} s, peak {peak} of {total} pages of {args.page_size} tokens, "
            f"{same}/{len(prompts)} answers equal to sequential"
        )


if __name__ == "__main__":
    main()
