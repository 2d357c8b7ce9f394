"""Memory of the benchmark process: resident set size and the peak during a block of code."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import types

import torch


def rss_bytes() -> int:
    """Current resident set size of this process.

    Returns
    -------
    int
        Bytes, from psutil when installed, else ``/proc/self/statm``, else the peak RSS so far.
    """
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is in the bench extra
        with contextlib.suppress(OSError, ValueError), open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return _max_rss_bytes()


def _max_rss_bytes() -> int:
    """Peak RSS of the process so far (``getrusage``; kilobytes on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakMemory:
    """Peak memory during a ``with`` block: CUDA ``max_memory_allocated`` on GPU, sampled RSS on CPU.

    ``ru_maxrss`` never goes down, so on CPU a background thread samples the RSS every
    ``interval`` seconds; the larger of the sampled peak and the RSS at the end is reported.

    Parameters
    ----------
    device : torch.device
        Device of the model being measured.
    interval : float
        Seconds between two RSS samples (CPU only).

    Attributes
    ----------
    peak : int
        Peak bytes of the block, set when it exits.
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.peak = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = rss_bytes()
            self._stop = False

            def sample() -> None:
                while not self._stop:
                    self.peak = max(self.peak, rss_bytes())
                    time.sleep(self.interval)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop = True
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, rss_bytes())
