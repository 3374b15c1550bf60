"""Noise schedules of Stable Diffusion 1.x, used by the tiny model too."""
from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def training_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, clip_sample=False)


def sampling_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)
