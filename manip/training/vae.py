"""VAE training: L1 reconstruction plus a small KL term on random crops."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from .images import batch_rng, psnr, random_crops, to_tensor, to_uint8
from .loop import LoopConfig, TrainResult, train


def train_vae(vae: AutoencoderKL, images: np.ndarray, cfg: LoopConfig, batch_size: int, crop: int,
              kl_weight: float, seed: int, checkpoint_dir: Path,
              fingerprint: dict | None = None) -> TrainResult:
    def loss_fn(step: int):
        x = to_tensor(random_crops(images, batch_rng(seed, step), batch_size, crop))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=torch.Generator().manual_seed(seed * 1_000_003 + step))).sample
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / x[0].numel()
        return l1 + kl_weight * kl, {"l1": l1.item(), "kl": kl.item()}

    return train(vae, loss_fn, cfg, checkpoint_dir, desc="vae", fingerprint=fingerprint)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Encode to the posterior mode and decode: the ceiling any latent model can reach."""
    out = []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i : i + batch]).to(vae.device)
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample))
    return np.concatenate(out)


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images: np.ndarray, n: int = 512) -> float:
    """1 / std of latents, so the diffusion model sees unit-variance inputs (SD's 0.18215)."""
    z = torch.cat([vae.encode(to_tensor(images[i : i + 64])).latent_dist.mode() for i in range(0, min(n, len(images)), 64)])
    return float(1.0 / z.std())


def test_psnr(vae: AutoencoderKL, images: np.ndarray) -> float:
    return float(np.mean(psnr(images, reconstruct(vae, images))))
