"""Latent-diffusion training of the UNet on frozen VAE latents and frozen text features (the
LDM objective), with min-SNR loss weighting for faster convergence."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .images import batch_rng, to_tensor
from .loop import LoopConfig, TrainResult, train


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch: int = 128) -> torch.Tensor:
    """Posterior means scaled by the VAE's scaling factor, computed once for the whole set."""
    out = [vae.encode(to_tensor(images[i : i + batch]).to(vae.device)).latent_dist.mode()
           for i in range(0, len(images), batch)]
    return torch.cat(out) * vae.config.scaling_factor


@torch.no_grad()
def encode_text(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(t.device)[t]
    snr = alphas / (1 - alphas)
    w = torch.clamp(snr, max=gamma) / snr
    return w if scheduler.config.prediction_type == "epsilon" else w * snr / (snr + 1)


def diffusion_loss(unet, scheduler: DDPMScheduler, latents: torch.Tensor, context: torch.Tensor,
                   generator: torch.Generator, concat: torch.Tensor | None = None,
                   shard: tuple[int, int] = (0, 1), min_snr: bool = True) -> torch.Tensor:
    """The LDM loss of a batch, min-SNR weighted unless `min_snr=False` (the plain loss the
    single-image editing papers fine-tune with). `concat` is appended to the noisy latents as
    extra input channels (InstructPix2Pix's image conditioning). With `shard=(rank, world)` the
    noise and timesteps are still drawn for the whole batch and this process takes every
    world-th item from `rank`, so a data-parallel run sees exactly the batch a single process would."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(latents.device)
    rank, world = shard
    if world > 1:
        part = slice(rank, None, world)
        latents, context, noise, t = latents[part], context[part], noise[part], t[part]
        concat = concat[part] if concat is not None else None
    noisy = scheduler.add_noise(latents, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    model_in = noisy if concat is None else torch.cat([noisy, concat], 1)
    pred = unet(model_in, t, context).sample
    per_item = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_item * min_snr_weights(scheduler, t)).mean() if min_snr else per_item.mean()


def train_unet(unet: UNet2DConditionModel, scheduler: DDPMScheduler, text_encoder: CLIPTextModel,
               tokenizer: CLIPTokenizer, latents: torch.Tensor, captions: list[list[str]], cfg: LoopConfig,
               batch_size: int, uncond_prob: float, seed: int, checkpoint_dir: Path,
              fingerprint: dict | None = None) -> TrainResult:
    """Each sample takes a random caption phrasing; `uncond_prob` of them the empty prompt, which
    is what classifier-free guidance needs at sampling time."""
    text_encoder.requires_grad_(False).eval()

    def loss_fn(step: int):
        rng = batch_rng(seed, step)
        idx = np.sort(rng.choice(len(latents), batch_size, replace=False))
        texts = ["" if rng.random() < uncond_prob else captions[i][int(rng.integers(len(captions[i])))] for i in idx]
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return diffusion_loss(unet, scheduler, latents[idx], encode_text(text_encoder, tokenizer, texts), gen), {}

    return train(unet, loss_fn, cfg, checkpoint_dir, desc="unet", fingerprint=fingerprint)
