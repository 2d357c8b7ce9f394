"""Print the compression report of a video prompt on the test-suite's tiny random Qwen2-VL.

Run from the repository root: ``python -m scripts.video_report_example`` (README, "Video inputs").
"""

import torch

from mixkv import MixKVPress
from tests.video_families import build_video_case

case = build_video_case("qwen2_vl")  # 8 real frames through Qwen2VLProcessor -> 64 video tokens
press = MixKVPress(budget=48, base="adakv", window_size=8)
with torch.inference_mode(), press(case.model):
    case.model.generate(**case.video_inputs, max_new_tokens=4, do_sample=False)
report = press.last_report
print(report.summary())
print(report.video_tokens_total, report.video_tokens_kept, report.visual_tokens_total)
