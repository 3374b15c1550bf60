"""Full-reference image quality on uint8 images, optionally restricted to a mask: MSE, PSNR and
SSIM (Wang et al. 2004: 11 x 11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, data range
255). Plain numpy, so it runs anywhere the rest of the library does.

The SSIM map has the image's own size (the window is mirrored at the borders), so a masked
SSIM is simply the mean of the map over the mask: background preservation is SSIM over the
pixels an edit should have left alone.
"""
from __future__ import annotations

import numpy as np

MAX_PSNR = 100.0  # identical images: 10 log10(255^2 / 1e-10) rounded down, as training.images.psnr caps


def _check(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected one HxW or HxWxC image, got shape {a.shape}")
    if mask is not None and mask.shape != a.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image {a.shape[:2]}")


def mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared error over all channels of the pixels in `mask` (all pixels if None);
    NaN when the mask is empty."""
    _check(a, b, mask)
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    if d.ndim == 3:
        d = d.mean(-1)
    if mask is not None:
        if not mask.any():
            return float("nan")
        d = d[mask.astype(bool)]
    return float(d.mean())


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB for uint8 images over the masked pixels; capped at MAX_PSNR, NaN for an empty mask."""
    m = mse(a, b, mask)
    if np.isnan(m):
        return m
    return float(min(MAX_PSNR, 10 * np.log10(255.0**2 / max(m, 1e-10))))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _filter(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation of an (H, W, C) array with the 1-D window `w` along both axes,
    mirrored borders ("reflect" in numpy, "mirror" in scipy.ndimage), output the input's size."""
    r = len(w) // 2
    h, wd = x.shape[:2]
    if min(h, wd) <= r:
        raise ValueError(f"image of {h}x{wd} pixels is too small for an SSIM window of {len(w)}")
    p = np.pad(x, ((r, r), (0, 0), (0, 0)), mode="reflect")
    x = sum(w[k] * p[k : k + h] for k in range(len(w)))
    p = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="reflect")
    return sum(w[k] * p[:, k : k + wd] for k in range(len(w)))


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, size: int = 11,
             sigma: float = 1.5) -> np.ndarray:
    """(H, W) SSIM map, averaged over channels."""
    _check(a, b, None)
    x, y = a.astype(np.float64), b.astype(np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    w = gaussian_window(size, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _filter(x, w), _filter(y, w)
    var_x = _filter(x * x, w) - mu_x**2
    var_y = _filter(y * y, w) - mu_y**2
    cov = _filter(x * y, w) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(-1)


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, **kwargs) -> float:
    """Mean SSIM over the masked pixels (all if None); NaN for an empty mask."""
    _check(a, b, mask)
    m = ssim_map(a, b, **kwargs)
    if mask is not None:
        if not mask.any():
            return float("nan")
        m = m[mask.astype(bool)]
    return float(m.mean())
