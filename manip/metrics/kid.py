"""Kernel Inception Distance on arbitrary features (here: the evaluator's image features).

Unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets; unlike FID it
is unbiased for small sample sizes, which is what a 2-core benchmark can afford.
"""
from __future__ import annotations

import numpy as np


def _mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(x: np.ndarray, y: np.ndarray, n_subsets: int = 50, subset_size: int = 200, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of MMD^2 over subsets of features x and y, each (N, D)."""
    rng = np.random.default_rng(seed)
    size = min(subset_size, len(x), len(y))
    vals = [_mmd2(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
            for _ in range(n_subsets)]
    return float(np.mean(vals)), float(np.std(vals))
