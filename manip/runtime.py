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
