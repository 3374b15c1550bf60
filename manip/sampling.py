"""Text-to-image sampling through the diffusers scheduler API.

Works on any `StableDiffusionPipeline`-shaped set of components (eps- or v-prediction, any
resolution the UNet accepts). Conditional and unconditional branches run as one batch, text
features are encoded once per call, and initial noise is drawn exactly as diffusers draws it,
so for the same generators the result matches `StableDiffusionPipeline.__call__`.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Protocol, Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from manip.prompts import read_prompts


@torch.inference_mode()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: Sequence[str],
                   placeholders: Collection[str] = ()) -> torch.Tensor:
    """Text features of the prompts as `read_prompts` reads them (`placeholders`: see there)."""
    ids = pipe.tokenizer(read_prompts(pipe.tokenizer, prompts, placeholders), padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


def initial_latents(pipe: StableDiffusionPipeline, n: int, generators, height: int | None = None,
                    width: int | None = None) -> torch.Tensor:
    scale = pipe.vae_scale_factor
    h = (height or pipe.unet.config.sample_size * scale) // scale
    w = (width or pipe.unet.config.sample_size * scale) // scale
    shape = (n, pipe.unet.config.in_channels, h, w)
    return randn_tensor(shape, generator=generators, device=pipe.unet.device, dtype=pipe.unet.dtype)


class StepHook(Protocol):
    """Called around every denoising step: attention controllers, local blending, inversion
    guidance. `end_step` may replace the latents."""

    def begin_step(self, step: int) -> None: ...

    def end_step(self, step: int, latents: torch.Tensor) -> torch.Tensor: ...


Uncond = torch.Tensor | Sequence[torch.Tensor] | None
# One classifier-free guidance scale for the batch, or one per sample (a dataset generator
# draws a scale per candidate and still runs them all in one batch).
Guidance = float | torch.Tensor


def guides(guidance_scale: Guidance) -> bool:
    """Whether any sample is guided at all (a scale of 1 is the plain conditional prediction)."""
    if torch.is_tensor(guidance_scale):
        return bool((guidance_scale != 1.0).any())
    return guidance_scale != 1.0


@torch.inference_mode()
def denoise(pipe: StableDiffusionPipeline, latents: torch.Tensor, cond: torch.Tensor, uncond: Uncond,
            steps: int, guidance_scale: Guidance, progress: bool = False, hooks: Sequence[StepHook] = (),
            scale_initial: bool = True, scheduler=None) -> torch.Tensor:
    """Run the scheduler over `steps` steps from `latents` to x_0.

    `uncond` is one unconditional context for every step, a per-step sequence (null-text
    inversion), or None / guidance 1 for no guidance; `guidance_scale` is a float or a (B,) tensor
    of per-sample scales. `scale_initial=False` starts from latents
    that are already at the first step's noise level (an inversion's x_T). `scheduler` overrides
    the pipeline's own (editing uses DDIM whatever the pipeline samples with).
    """
    scheduler = scheduler or pipe.scheduler
    scheduler.set_timesteps(steps, device=latents.device)
    if scale_initial:
        latents = latents * scheduler.init_noise_sigma
    guided = uncond is not None and guides(guidance_scale)
    if torch.is_tensor(guidance_scale):
        guidance_scale = guidance_scale.to(latents).reshape(-1, *[1] * (latents.dim() - 1))
    per_step = guided and not torch.is_tensor(uncond)
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sample", leave=False)):
        for h in hooks:
            h.begin_step(i)
        if guided:
            u = uncond[i] if per_step else uncond
            context = torch.cat([u.expand(len(cond), *u.shape[-2:]), cond])
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        else:
            context, model_in = cond, scheduler.scale_model_input(latents, t)
        out = pipe.unet(model_in, t, encoder_hidden_states=context, return_dict=False)[0]
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        latents = scheduler.step(out, t, latents, return_dict=False)[0]
        for h in hooks:
            latents = h.end_step(i, latents)
    return latents


@torch.inference_mode()
def decode(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> np.ndarray:
    """Latents -> uint8 NHWC images."""
    x = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def generate(pipe: StableDiffusionPipeline, prompts: Sequence[str], generators: list[torch.Generator],
             steps: int = 50, guidance_scale: float = 7.5, negative_prompt: str = "", progress: bool = False,
             placeholders: Collection[str] = ()) -> np.ndarray:
    if len(generators) != len(prompts):
        raise ValueError(f"need one generator per prompt, got {len(generators)} for {len(prompts)} prompts")
    cond = encode_prompts(pipe, prompts, placeholders)
    uncond = encode_prompts(pipe, [negative_prompt]).expand_as(cond) if guidance_scale != 1.0 else None
    latents = initial_latents(pipe, len(prompts), generators)
    return decode(pipe, denoise(pipe, latents, cond, uncond, steps, guidance_scale, progress))
