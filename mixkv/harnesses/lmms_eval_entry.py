"""The ``lmms_eval.models`` entry point: lmms-eval's model type ``mixkv``.

Kept apart from :mod:`mixkv.harnesses.lmms_eval_model`, which imports lmms-eval's models: lmms-eval
reads its entry points while its own ``lmms_eval.models`` package is being imported.
"""

from __future__ import annotations

from typing import Any

MODEL_NAME = "mixkv"


def manifest() -> Any:
    """lmms-eval's ``ModelManifest`` of model type ``mixkv`` (a chat model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, chat_class_path="mixkv.harnesses.lmms_eval_model.MixKVLMMs")
