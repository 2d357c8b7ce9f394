"""KVzip's extra prefill cost: the prompt's prefill alone vs the reconstruction forwards of KVzipPress.

SmolLM2-135M-Instruct (embedded weights), float32, sdpa, one thread, random token ids, budget 128,
prompts of 1,024 and 2,048 tokens, two runs each. Run from the repository root:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/kvzip_cost.py
"""

import time

import torch
from transformers import DynamicCache

import mixkv
from mixkv.integration import kvzip_prompt_ids
from mixkv.model_loading import load_model

torch.set_num_threads(1)
model, tok = load_model("smollm2")
ids_all = torch.randint(0, tok.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(0))
prompt_ids = kvzip_prompt_ids(tok)
print("repeat ids", {k: len(v) for k, v in prompt_ids.items()}, flush=True)
for n in (1024, 2048):
    ids = ids_all[:, :n]
    for run in range(2):
        with torch.no_grad():
            t = time.perf_counter()
            model(ids, past_key_values=DynamicCache(config=model.config), logits_to_keep=1)
            plain = time.perf_counter() - t
            press = mixkv.KVzipPress(budget=128, **prompt_ids)
            t = time.perf_counter()
            with press(model):
                model(ids, past_key_values=DynamicCache(config=model.config), logits_to_keep=1)
            total = time.perf_counter() - t
        rec = press.last_reconstruction_seconds
        print(
            f"n={n} run={run} plain_prefill={plain:.2f}s kvzip_total={total:.2f}s reconstruction={rec:.2f}s "
            f"compression={press.last_report.compression_seconds:.2f}s ratio={rec / plain:.2f}",
            flush=True,
        )
