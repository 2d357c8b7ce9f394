"""Compress one prompt on Qwen2.5-Coder-0.5B-Instruct, in one process or tensor-parallel under torchrun.

Usage (the model of the ``qwen`` extra, converted on first use into ``$MIXKV_CACHE`` or ~/.cache/mixkv):

    python scripts/tensor_parallel_check.py mixkv-adakv                                   # one process
    torchrun --standalone --nproc-per-node 2 scripts/tensor_parallel_check.py mixkv-adakv  # KV heads split

Rank 0 prints the greedy answer and the kept tokens per layer and KV head of each named press (budget
128): tensor-parallel runs print what the one-process run prints (docs/scale-out.md).
"""

import inspect
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DistributedConfig

from mixkv.presses.registry import from_name
from mixkv.weights import qwen_model_path

folder = qwen_model_path()
torch.set_num_threads(1)
parallel = {"distributed_config": DistributedConfig(tp_plan="auto")} if "RANK" in os.environ else {}
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **parallel)
tokenizer = AutoTokenizer.from_pretrained(folder)
question = "\n\nWhat does the first line of this module's docstring say?"
messages = [{"role": "user", "content": inspect.getsource(inspect)[:3500] + question}]
ids = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
)["input_ids"]
for name in sys.argv[1:]:
    press = from_name(name, budget=128)
    start = time.perf_counter()
    with press(model):
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", 0)) == 0:
        answer = tokenizer.decode(out[0, ids.shape[1] :])
        print(
            f"{name}, {os.environ.get('WORLD_SIZE', 1)} rank(s), {ids.shape[1]} prompt tokens, {seconds:.1f} s: {answer!r}"
        )
        print("  kept per layer and KV head:", press.last_report.kept_tokens[0].tolist())
        print("  " + press.last_report.summary())
