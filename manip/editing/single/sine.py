"""SINE (Zhang et al., 2023): single-image editing with model-based classifier-free guidance.

Fine-tuning is patch-based: each step trains on random crops of the input (a `patch_min` to
1 share of its side) resized to the lower `patch_size`, captioned "[token] [source caption]".
A model that only ever saw patches learns the image's content, not its frame, which is what
lets it render the edit at any resolution (`resolution`). The crops carry no coordinate
conditioning (the paper adds positional embeddings; a stock diffusers UNet has no input for
them).

Editing combines the two models. For the first `guide_until` of the steps,

    eps = e_pre(x) + w * [v * (e_ft(x, c_hat) - e_pre(x)) + (1 - v) * (e_pre(x, c) - e_pre(x))]

with c_hat the fine-tuning caption and c the target caption; after that the pre-trained model
alone finishes under c, which sharpens the edit. The fine-tune depends on the image and the
source caption, not the target, so it is cached for every later edit of the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .base import (EditOutput, EditRequest, SingleImageEditor, TuneConfig, _Run, cfg_predictor, ddim_sample, eps_of, finetune,
                   tuned_unet)


@dataclass(frozen=True)
class SINEConfig:
    token: str = "sks"
    tune: TuneConfig = TuneConfig(steps=150, lr=5e-5)
    patch_size: int = 48  # pixels; a multiple of the VAE factor
    patch_min: float = 0.6  # smallest crop, as a share of the image side
    v: float = 0.7  # weight of the fine-tuned model in the guidance
    guide_until: float = 0.6  # share of the steps that use the fine-tuned model
    steps: int = 50
    guidance_scale: float = 7.5
    resolution: int | None = None  # output side in pixels; None: the model's own

    def __post_init__(self) -> None:
        if not self.token.strip() or self.steps < 1:
            raise ValueError(f"sine needs a non-empty token and steps >= 1; got {self.token!r}, {self.steps}")
        if not 0.0 < self.patch_min <= 1.0 or not 0.0 <= self.v <= 1.0 or not 0.0 <= self.guide_until <= 1.0:
            raise ValueError(f"sine patch_min must be in (0, 1], v and guide_until in [0, 1]; got {self}")
        if self.patch_size < 8 or (self.resolution is not None and self.resolution < 8):
            raise ValueError(f"sine patch_size and resolution must be at least 8 pixels; got {self}")


def crops(image: np.ndarray, rng: np.random.Generator, n: int, smallest: float, size: int) -> np.ndarray:
    """`n` square crops of random side (`smallest` to 1 of the image) and place, resized to `size`."""
    h = image.shape[0]
    out = []
    for _ in range(n):
        side = int(rng.integers(max(1, round(smallest * h)), h + 1))
        y, x = (int(v) for v in rng.integers(0, h - side + 1, 2))
        patch = Image.fromarray(image[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
        out.append(np.asarray(patch))
    return np.stack(out)


class SINE(SingleImageEditor):
    name = "sine"
    version = 2
    Config = SINEConfig
    config: SINEConfig

    def placeholders(self) -> set[str]:
        return {self.config.token}

    def prompts(self, request: EditRequest) -> list[str]:
        return [f"{self.config.token} {request.source}", request.target]

    def _edit(self, run: _Run) -> EditOutput:
        r, c = run.request, self.config
        factor = self.pipe.vae_scale_factor
        if c.patch_size % factor or (c.resolution or factor) % factor:
            raise ValueError(f"sine patch_size and resolution must be multiples of the VAE factor {factor}")
        c_hat = self.text([f"{c.token} {r.source}"])
        state = run.part("finetune", [r.image, r.source, c.token, r.seed, c.tune, c.patch_size, c.patch_min],
                         lambda ckpt: finetune(
                             self.pipe, lambda rng, n: (self.latents(crops(r.image, rng, n, c.patch_min, c.patch_size)),
                                                        c_hat),
                             c.tune, r.seed, ckpt, "sine fine-tune", {"token": c.token}))
        tuned = tuned_unet(self.pipe, state)
        side = (c.resolution or self.pipe.unet.config.sample_size * factor) // factor
        noise = self.noise(r.seed, side)
        uncond, target = self.text([""]), self.text([r.target])
        pre = cfg_predictor(self.pipe, self.pipe.unet, target, uncond, c.guidance_scale)
        switch = round(c.guide_until * c.steps)

        def predict(x, t, i):
            if i >= switch:
                return pre(x, t, i)
            e_u, e_c = eps_of(self.pipe, self.pipe.unet, torch.cat([x, x]), t, torch.cat([uncond, target])).chunk(2)
            e_ft = eps_of(self.pipe, tuned, x, t, c_hat)
            return e_u + c.guidance_scale * (c.v * (e_ft - e_u) + (1 - c.v) * (e_c - e_u))

        edited = ddim_sample(self.pipe, noise, predict, c.steps)
        recon = ddim_sample(self.pipe, noise, cfg_predictor(self.pipe, tuned, c_hat, uncond, c.guidance_scale), c.steps)
        images = self.decode(torch.cat([edited, recon]))
        return run.output(images[0], images[1])
