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
