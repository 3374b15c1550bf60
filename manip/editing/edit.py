"""Prompt-to-Prompt editing, from an inversion of a real image or from fresh noise.

Both paths sample the batch [source, target_1, ...] from one shared x_T with the attention
controller installed, and return [source reconstruction, edit_1, ...] as uint8 images.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from manip.sampling import StepHook, Uncond, decode, denoise, encode_prompts, initial_latents

from .attention import controlled_attention
from .inversion import DirectInversionHook, Inversion, ddim_scheduler
from .p2p import P2PConfig, PromptToPrompt


def _p2p(pipe: StableDiffusionPipeline, x_T: torch.Tensor, prompts: Sequence[str], uncond: Uncond, steps: int,
         guidance_scale: float, config: P2PConfig, hooks: Sequence[StepHook], scale_initial: bool) -> np.ndarray:
    controller = PromptToPrompt(pipe.tokenizer, prompts, steps, config, guided=guidance_scale != 1.0)
    cond = encode_prompts(pipe, prompts)
    latents = x_T.expand(len(prompts), *x_T.shape[1:]).clone()
    with controlled_attention(pipe.unet, controller):
        out = denoise(pipe, latents, cond, uncond, steps, guidance_scale, hooks=[*hooks, controller],
                      scale_initial=scale_initial, scheduler=ddim_scheduler(pipe))
    return decode(pipe, out)


def edit_inverted(pipe: StableDiffusionPipeline, inversion: Inversion, targets: Sequence[str],
                  config: P2PConfig = P2PConfig()) -> np.ndarray:
    """Edit a real image through its inversion; image 0 is the reconstruction."""
    inversion.check(pipe)
    prompts = [inversion.prompt, *targets]
    uncond = [u[None] for u in inversion.uncond]
    hooks = [DirectInversionHook(inversion)] if inversion.method == "direct" else []
    return _p2p(pipe, inversion.x_T, prompts, uncond, inversion.steps, inversion.guidance_scale, config, hooks,
                scale_initial=False)


def edit_generated(pipe: StableDiffusionPipeline, prompts: Sequence[str], generator: torch.Generator,
                   config: P2PConfig = P2PConfig(), steps: int = 50, guidance_scale: float = 7.5,
                   negative_prompt: str = "") -> np.ndarray:
    """Prompt-to-Prompt on a generated image: all prompts share the noise drawn from `generator`."""
    x_T = initial_latents(pipe, 1, generator)
    uncond = encode_prompts(pipe, [negative_prompt]) if guidance_scale != 1.0 else None
    return _p2p(pipe, x_T, prompts, uncond, steps, guidance_scale, config, (), scale_initial=True)
