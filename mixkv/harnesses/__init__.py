"""Community evaluation harnesses with a mixkv press attached (optional extras).

* :mod:`mixkv.harnesses.lm_eval_model` - EleutherAI's lm-evaluation-harness (``pip install
  "mixkv[lm-eval]"``; ``mixkv lm-eval ...``), model type ``mixkv``.
* :mod:`mixkv.harnesses.lmms_eval_model` - lmms-eval for vision-language models (``pip install
  "mixkv[lmms-eval]"``; ``mixkv lmms-eval ...``), model type ``mixkv``.

Neither is imported by ``import mixkv``.
"""
