"""The ``mixkv_sdpa`` / ``mixkv_eager`` attention functions and the modules bound to them.

A session registers a function in transformers' ``AttentionInterface`` (and the matching mask
function in ``AttentionMaskInterface``) and points the text decoder's config at it, so the model
calls it with its own post-rotary queries: scoring is right for every rotary variant (Qwen-VL's
multi-axis M-RoPE included) without re-implementing it. The registered function is global; it finds
the session of each attention module through a binding made for the duration of a ``with`` block,
and the registrations are dropped when no session is active.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

#: The model's attention implementation -> the name mixkv registers in its place.
FUNCTION_NAMES = {"sdpa": "mixkv_sdpa", "eager": "mixkv_eager"}

AttentionOutput = tuple[torch.Tensor, torch.Tensor | None]


class AttentionHandler(Protocol):
    """What a binding forwards each attention call to (the press session)."""

    def attention(
        self,
        binding: Binding,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> AttentionOutput: ...


@dataclass
class Binding:
    """One attention module attached to a session: its layer and the function it replaced."""

    session: AttentionHandler
    layer_idx: int
    original: Callable[..., AttentionOutput]


# id(attention module) -> binding, only while a press is active on that module.
_BINDINGS: dict[int, Binding] = {}
_active_sessions = 0


def _mixkv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> AttentionOutput:
    binding = _BINDINGS.get(id(module))
    if binding is None:
        raise RuntimeError(
            f"{type(module).__name__} is configured for mixkv attention but no press is attached to it; "
            "use the model inside `with press(model): ...` only"
        )
    return binding.session.attention(binding, module, query, key, value, attention_mask, **kwargs)


def is_bound(module: torch.nn.Module) -> bool:
    """Whether a session is attached to ``module``."""
    return id(module) in _BINDINGS


def bind(module: torch.nn.Module, binding: Binding) -> int:
    """Route ``module``'s mixkv attention calls to ``binding``; returns the key :func:`unbind` takes."""
    _BINDINGS[id(module)] = binding
    return id(module)


def unbind(key: int) -> None:
    """Drop a binding made by :func:`bind` (if still there)."""
    _BINDINGS.pop(key, None)


def register_functions() -> None:
    """Register the mixkv attention and mask functions, once for all active sessions."""
    global _active_sessions
    if _active_sessions == 0:
        for original, name in FUNCTION_NAMES.items():
            AttentionInterface.register(name, _mixkv_attention)
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    _active_sessions += 1


def unregister_functions() -> None:
    """Undo one :func:`register_functions`; the last active session drops the registrations."""
    global _active_sessions
    _active_sessions -= 1
    if _active_sessions == 0:
        for name in FUNCTION_NAMES.values():
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)


def original_attention(module: torch.nn.Module, implementation: str) -> Callable[..., Any]:
    """The attention function ``module`` would call under ``implementation`` without a press.

    Raises
    ------
    ValueError
        If ``implementation`` is ``"eager"`` and the module's modeling file has no eager function.
    """
    if implementation == "eager":
        # Eager attention is model-specific (softcapping, sinks...): use the one beside the module's class.
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise ValueError(
                f"{type(module).__name__} has no eager attention function; load the model with 'sdpa'"
            )
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]
