"""Batches from uint8 image arrays, drawn by seeded generators."""
from __future__ import annotations

import numpy as np
import torch


def batch_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, step])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the range diffusers' VAEs expect."""
    x = torch.from_numpy(np.array(images, dtype=np.float32)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def random_crops(images: np.ndarray, rng: np.random.Generator, batch: int, crop: int) -> np.ndarray:
    idx = np.sort(rng.integers(0, len(images), batch))
    h = images.shape[1]
    ys, xs = rng.integers(0, h - crop + 1, batch), rng.integers(0, h - crop + 1, batch)
    return np.stack([images[i, y : y + crop, x : x + crop] for i, y, x in zip(idx, ys, xs)])


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 arrays (N,H,W,C)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
