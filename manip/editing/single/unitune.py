"""UniTune (Valevski et al., 2023): fine-tune the model on the one image under a caption of rare
tokens only, then edit with "[rare tokens] [edit prompt]".

The fine-tune does not see any caption of the image, so it serves every later edit of that
image: the part is keyed by (image, model, token, seed, fine-tune settings). The edit's controls
are the paper's: start the sampler from the input noised to a fraction `start` of the schedule
instead of pure noise, and for the first `blend_until` of the steps it runs mix the latents
with the input noised to the same level (weight `blend_weight`), which trades edit strength
for fidelity.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import (EditOutput, EditRequest, SingleImageEditor, TuneConfig, _Run, cfg_predictor, ddim_sample, finetune,
                   mix, schedule, tuned_unet)


@dataclass(frozen=True)
class UniTuneConfig:
    token: str = "sks"
    tune: TuneConfig = TuneConfig(steps=150, lr=5e-5)
    start: float = 0.9
    blend_until: float = 0.2
    blend_weight: float = 0.5
    steps: int = 50
    guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        if not self.token.strip() or self.steps < 1:
            raise ValueError(f"unitune needs a non-empty token and steps >= 1; got {self.token!r}, {self.steps}")
        if not 0.0 < self.start <= 1.0 or not 0.0 <= self.blend_until <= 1.0 or not 0.0 <= self.blend_weight <= 1.0:
            raise ValueError(f"unitune start must be in (0, 1], blend_until and blend_weight in [0, 1]; got {self}")


class UniTune(SingleImageEditor):
    name = "unitune"
    version = 2
    Config = UniTuneConfig
    config: UniTuneConfig

    def placeholders(self) -> set[str]:
        return {self.config.token}

    def prompts(self, request: EditRequest) -> list[str]:
        return [f"{self.config.token} {request.target}"]

    def _edit(self, run: _Run) -> EditOutput:
        r, c = run.request, self.config
        z0 = self.latents(r.image)
        rare = self.text([c.token])
        state = run.part("finetune", [r.image, c.token, r.seed, c.tune],
                         lambda ckpt: finetune(self.pipe, lambda rng, n: (z0.expand(n, -1, -1, -1), rare), c.tune,
                                               r.seed, ckpt, "unitune fine-tune", {"token": c.token}))
        unet = tuned_unet(self.pipe, state)
        noise = self.noise(r.seed)
        plan = schedule(self.pipe, c.steps, c.start)
        blend_steps = round(c.blend_until * len(plan.timesteps))

        def blend(k, alpha, x):
            return x if k >= blend_steps else (1 - c.blend_weight) * x + c.blend_weight * mix(z0, noise, alpha)

        x_start = mix(z0, noise, plan.alphas[0]) if c.start < 1 else noise
        cond = self.text([f"{c.token} {r.target}", c.token])
        predict = cfg_predictor(self.pipe, unet, cond, self.text([""]), c.guidance_scale)
        x = ddim_sample(self.pipe, x_start, predict, c.steps, start=c.start, after_step=blend)
        images = self.decode(x)
        return run.output(images[0], images[1])
