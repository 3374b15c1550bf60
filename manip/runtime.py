"""Process-wide runtime settings shared by the stages and the command line."""
from __future__ import annotations

import os

import torch


def set_threads() -> None:
    """MANIP_THREADS caps intra-op threads, e.g. to run two jobs side by side on two cores
    without oversubscribing them."""
    n = int(os.environ.get("MANIP_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)


def device() -> torch.device:
    """Where the heavy stages run: `MANIP_DEVICE` if set (`cpu`, `cuda`, `cuda:1`), else the GPU
    when there is one. Random draws stay on CPU generators whatever the device, so a seed
    gives the same noise on a workstation and on a GPU worker."""
    name = os.environ.get("MANIP_DEVICE", "").strip()
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"MANIP_DEVICE={name!r} is not a torch device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"MANIP_DEVICE={name!r} but this torch build sees no CUDA device")
    return dev


def release_free_heap() -> None:
    """Hand the allocator's free pages back to the OS (glibc only). Memory that earlier work
    freed stays resident in the heap and would be reused silently, hiding what the next block
    allocates from a resident-set measurement."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement is a lower bound
        pass


class PeakMemory:
    """Peak memory of the work inside the block, in MB: allocated CUDA memory on a GPU, else
    the process's resident set sampled every 20 ms, above what it held on entry once free heap
    pages are handed back."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.megabytes = 0.0

    def __enter__(self) -> "PeakMemory":
        import threading

        import psutil

        self._cuda = torch.cuda.is_available() and device().type == "cuda"
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._proc = psutil.Process()
        release_free_heap()
        self._start = self._proc.memory_info().rss
        self._peak = self._start
        self._stop = threading.Event()

        def watch() -> None:
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, self._proc.memory_info().rss)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._proc.memory_info().rss)
        self.megabytes = round((peak - self._start) / 2**20, 1)
