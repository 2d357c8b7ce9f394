"""The server's side of the batching manager, and the size of its paged cache.

:class:`ManagerSeam` is the one place that names the manager running the server's requests
(:class:`~mixkv.integration.continuous_batching.PressBatchingManager`); swapping the engine is a
change here only. :class:`CacheSizing` says how big its paged cache is.

Example
-------
>>> sizing = CacheSizing(max_cache_tokens=1000, page_size=32)
>>> sizing.num_blocks
32
>>> seam = ManagerSeam(model, GenerationConfig(do_sample=False), sizing)
>>> seam.start(); seam.usage().pages_free
32
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from mixkv.integration.continuous_batching import PageUsage

__all__ = ["CacheSizing", "ManagerSeam"]


@dataclass(frozen=True)
class CacheSizing:
    """How big the paged KV cache is. Explicit sizes: the engine never sizes itself from free memory.

    Attributes
    ----------
    max_cache_tokens
        KV entries (per layer) of the whole cache, shared by every request in flight; rounded up
        to whole pages. It is also the most one request can ever hold.
    page_size
        Tokens per page: the unit the cache hands out and takes back (small pages let a press
        give memory back; see ``docs/guide.md``).
    max_batch_tokens
        Tokens one forward processes (long prompts are prefilled in chunks of this size).
    """

    max_cache_tokens: int = 4096
    page_size: int = 32
    max_batch_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("max_cache_tokens", "page_size", "max_batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_cache_tokens < self.page_size:
            raise ValueError(
                f"max_cache_tokens ({self.max_cache_tokens}) must hold at least one page of {self.page_size} tokens"
            )

    @property
    def num_blocks(self) -> int:
        """Pages of the cache (each holds ``page_size`` tokens of every layer)."""
        return math.ceil(self.max_cache_tokens / self.page_size)

    def batching_config(self) -> Any:
        """transformers' ``ContinuousBatchingConfig`` for this size: no prefix sharing, synchronous
        batching (a press rewrites a request's pages, which neither tolerates)."""
        from transformers import ContinuousBatchingConfig

        return ContinuousBatchingConfig(
            num_blocks=self.num_blocks,
            page_size=self.page_size,
            max_batch_tokens=self.max_batch_tokens,
            allow_block_sharing=False,
            use_async_batching=False,
        )


class ManagerSeam:
    """The one place that knows which batching manager runs the requests.

    It runs :class:`~mixkv.integration.continuous_batching.PressBatchingManager` (transformers'
    ``ContinuousBatchingManager`` compressing each request's prompt at the end of its prefill),
    with no default press: the server passes every request's press (or ``"full"``) explicitly. A
    model that manager cannot compress (sliding-window layers, e.g. Gemma 3) is still served with
    the full cache, and every press is refused with the reason.

    Parameters
    ----------
    model
        A causal LM (``transformers``' ``PreTrainedModel``).
    generation_config
        The greedy ``GenerationConfig`` every request starts from.
    sizing
        The cache's size.
    """

    #: Name of the engine, as ``/v1/mixkv/cache`` reports it.
    engine_name = "mixkv.integration.continuous_batching.PressBatchingManager"

    def __init__(self, model: Any, generation_config: Any, sizing: CacheSizing) -> None:
        from mixkv.integration.continuous_batching import PressBatchingManager

        self.sizing = sizing
        self.model_refusal: str | None = None
        config = sizing.batching_config()
        try:
            self.manager = PressBatchingManager(
                model, generation_config=generation_config, batching_config=config
            )
        except ValueError as exc:  # the model, not a press: serve it with the full cache only
            self.model_refusal = str(exc)
            self.manager = PressBatchingManager(
                model, generation_config=generation_config, batching_config=config, block_sharing=True
            )

    def start(self) -> None:
        """Start the manager's thread (its paged cache is built already, so its size is known)."""
        self.manager.start()

    def refusal(self, press: Any) -> str | None:
        """Why the engine cannot run ``press`` (None: it can; None is the full cache)."""
        from mixkv.integration.paged_support import check_press

        if press is None:
            return None
        if self.model_refusal is not None:
            return self.model_refusal
        try:
            check_press(press)
        except ValueError as exc:
            return str(exc)
        return None

    def add(
        self, input_ids: list[int], request_id: str, max_new_tokens: int, press: Any, stream: bool
    ) -> None:
        """Queue one request (``press`` has passed :meth:`refusal`; None runs the full cache).

        Raises
        ------
        ValueError
            When the manager refuses the request (a press, or a request that can never fit).
        """
        from mixkv.integration.continuous_batching import FULL

        self.manager.add_request(
            input_ids,
            request_id=request_id,
            max_new_tokens=max_new_tokens,
            streaming=stream,
            press=FULL if press is None else press,
        )

    def tokens_needed(self, prompt_tokens: int, max_new_tokens: int, press: Any) -> int:
        """Cache entries one request may hold at its peak: its whole prompt until its prefill ends,
        then what the press keeps of it plus the answer."""
        held = prompt_tokens if press is None else min(prompt_tokens, press.sequence_budget(prompt_tokens))
        return max(prompt_tokens, held + max_new_tokens)

    def capacity_tokens(self) -> int:
        """The most tokens one request can ever hold."""
        return int(self.manager.cache_capacity_tokens)

    def usage(self) -> PageUsage:
        """Pages in use and free, and per request."""
        if self.manager.batch_processor is None:  # stopped: every page is free
            return PageUsage(self.sizing.page_size, self.sizing.num_blocks, self.sizing.num_blocks, {}, {})
        return self.manager.page_usage()

    def compression(self, request_id: str) -> dict[str, Any] | None:
        """What the end of a request's prefill kept and freed, once it has happened."""
        record = self.manager.compression_info(request_id)
        if record is None:
            return None
        return {
            "prompt_tokens": record.prompt_tokens,
            "kept_tokens": record.kept_tokens,
            "freed_pages": record.freed_pages,
        }

    def fatal_error(self) -> str | None:
        """The error that stopped the manager's thread, if one did."""
        error = self.manager.background_thread_status.fatal_error
        return None if error is None else str(error)

    def next_output(self, timeout: float) -> Any:
        """The next output of any request, or None after ``timeout`` seconds."""
        output = self.manager.get_result(timeout=timeout)
        if output is None and not self.manager.is_running():
            time.sleep(timeout)  # get_result returns at once when the thread is gone
        return output

    def cancel(self, request_id: str) -> None:
        """Cancel a request: the manager drops it and its pages go back to the pool."""
        self.manager.cancel_request(request_id)

    def stop(self) -> None:
        """Stop the manager's thread (requests still running fail) and give the model its attention back."""
        self.manager.stop(block=True, timeout=10, hard_stop=True)
