"""InstructPix2Pix fine-tuning of a text-to-image Stable Diffusion (Brooks et al., 2023).

The UNet's first convolution takes twice its input channels (4 -> 8 for Stable Diffusion),
[noisy latents, input-image latents], with the new weights at zero so training starts from the base model's behaviour. The
text and the image condition are dropped for 5% of the samples each and both for another 5%
(classifier-free guidance over two conditions at inference). Training runs through the shared
loop (EMA, exact resume) and optionally data-parallel through `accelerate`.

Everything frozen is computed once: the input-image latents (posterior modes, unscaled, as the
diffusers pipeline conditions on them), the edited-image posteriors (a fresh latent is drawn
from each at every step, exactly as encoding every step would) and the text features of each
distinct instruction. Only the UNet runs per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDPMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)

from manip.training.images import batch_rng, to_tensor
from manip.training.loop import LoopConfig, TrainResult, train
from manip.training.unet import diffusion_loss, encode_text


@dataclass(frozen=True)
class DropoutSettings:
    text: float = 0.05  # text condition dropped, image kept
    image: float = 0.05  # image condition dropped, text kept
    both: float = 0.05

    def __post_init__(self) -> None:
        if min(self.text, self.image, self.both) < 0 or self.text + self.image + self.both > 1:
            raise ValueError(f"dropout probabilities must be >= 0 and sum to at most 1, got {self}")

    def masks(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(drop text, drop image) for uniform draws `u`: text alone below `text`, both from there
        to `text + both`, image alone on the next `image`."""
        return u < self.text + self.both, (u >= self.text) & (u < self.text + self.both + self.image)


def widen_conv_in(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Double conv_in's input channels (in place) for the image latents, the new ones at zero;
    returns the UNet."""
    old = unet.conv_in
    extra = old.in_channels
    new = torch.nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding,
                          device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels + extra)
    return unet


@dataclass
class PairTensors:
    source: torch.Tensor  # (N, C, h, w) input-image latents, unscaled posterior modes
    target_mean: torch.Tensor  # (N, C, h, w) edited-image posterior mean, times the VAE scaling factor
    target_std: torch.Tensor
    prompt_index: torch.Tensor  # (N,) row of `prompts` holding each pair's instruction
    prompts: torch.Tensor  # (P, K, D) text features of the distinct instructions
    null: torch.Tensor  # (K, D) text features of the empty prompt

    def __len__(self) -> int:
        return len(self.source)

    def to(self, device) -> "PairTensors":
        return PairTensors(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})


@torch.no_grad()
def encode_pairs(vae: AutoencoderKL, text_encoder, tokenizer, inputs: np.ndarray, edited: np.ndarray,
                 instructions: Sequence[str], batch: int = 64) -> PairTensors:
    sources, means, stds = [], [], []
    for i in range(0, len(inputs), batch):
        sources.append(vae.encode(to_tensor(inputs[i : i + batch]).to(vae.device)).latent_dist.mode())
        dist = vae.encode(to_tensor(edited[i : i + batch]).to(vae.device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    scale = vae.config.scaling_factor
    distinct = sorted(set(instructions))
    index = {p: i for i, p in enumerate(distinct)}
    return PairTensors(
        source=torch.cat(sources), target_mean=torch.cat(means) * scale, target_std=torch.cat(stds) * scale,
        prompt_index=torch.tensor([index[p] for p in instructions], device=vae.device),
        prompts=torch.cat([encode_text(text_encoder, tokenizer, distinct[i : i + 256]) for i in range(0, len(distinct), 256)]),
        null=encode_text(text_encoder, tokenizer, [""])[0])


def ip2p_loss(unet, scheduler: DDPMScheduler, data: PairTensors, batch_size: int, dropout: DropoutSettings,
              seed: int, step: int, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The loss of step `step`: the batch, the dropout draws, the latent samples, noise and
    timesteps all come from (seed, step), for the whole batch, whatever the number of processes."""
    rng = batch_rng(seed, step)
    device = data.source.device
    idx = torch.from_numpy(np.sort(rng.choice(len(data), batch_size, replace=False))).to(device)
    u = torch.from_numpy(rng.random(batch_size)).float().to(device)
    drop_text, drop_image = dropout.masks(u)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noise = torch.randn(data.target_mean[idx].shape, generator=gen).to(device)
    latents = data.target_mean[idx] + data.target_std[idx] * noise
    context = torch.where(drop_text[:, None, None], data.null, data.prompts[data.prompt_index[idx]])
    image = data.source[idx] * (~drop_image).float()[:, None, None, None]
    return diffusion_loss(unet, scheduler, latents, context, gen, concat=image, shard=shard)


def finetune(unet: UNet2DConditionModel, scheduler: DDPMScheduler, data: PairTensors, cfg: LoopConfig,
             batch_size: int, dropout: DropoutSettings, seed: int, checkpoint_dir: Path,
             fingerprint: dict | None = None, accelerator=None) -> TrainResult:
    """Train an already widened UNet on `data`. With an `accelerate.Accelerator` of N processes
    each computes 1/N of every batch (`batch_size` must divide evenly)."""
    if len(data) < batch_size:
        raise ValueError(f"the dataset has {len(data)} pairs, fewer than one batch of {batch_size}")
    world = accelerator.num_processes if accelerator is not None else 1
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must divide evenly over {world} processes")
    runner = accelerator.prepare_model(unet) if accelerator is not None and world > 1 else unet
    shard = (accelerator.process_index, world) if accelerator is not None else (0, 1)

    def loss_fn(step: int):
        return ip2p_loss(runner, scheduler, data, batch_size, dropout, seed, step, shard), {}

    return train(unet, loss_fn, cfg, checkpoint_dir, desc="ip2p", fingerprint=fingerprint, accelerator=accelerator)


def instruct_pipeline(base: StableDiffusionPipeline, unet: UNet2DConditionModel) -> StableDiffusionInstructPix2PixPipeline:
    """The fine-tuned UNet with the base model's VAE and text encoder, sampling with Euler
    ancestral as the paper does."""
    return StableDiffusionInstructPix2PixPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(base.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
