"""DreamBooth (Ruiz et al., 2023): fine-tune the UNet (and optionally the text encoder) on
"a [identifier] [class]" captions, with the class-specific prior preservation loss on class
images the base model generated (pass them as the `prior` of `fit`; weight 1.0 as the paper).

The artifact is a whole diffusers pipeline folder, loaded with `from_pretrained`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from .base import Customizer, FitConfig


@dataclass(frozen=True)
class DreamBoothConfig(FitConfig):
    lr: float = 5e-5
    train_text_encoder: bool = False


class DreamBooth(Customizer):
    method = "dreambooth"
    Config = DreamBoothConfig
    config: DreamBoothConfig

    def text_trains(self) -> bool:
        return self.config.train_text_encoder

    def _prepare(self):
        modules = {"unet": self.pipe.unet}
        if self.config.train_text_encoder:
            modules["text_encoder"] = self.pipe.text_encoder
        state = torch.nn.ModuleDict(modules)
        state.requires_grad_(True)
        return state, list(state.parameters())

    def _finish(self) -> None:
        self.pipe.unet.requires_grad_(False)
        self.pipe.text_encoder.requires_grad_(False)

    def _save_artifact(self, directory: Path) -> None:
        self.pipe.save_pretrained(directory)

    def _load_artifact(self, directory: Path) -> None:
        tuned = StableDiffusionPipeline.from_pretrained(directory, safety_checker=None, requires_safety_checker=False)
        self.pipe.unet.load_state_dict(tuned.unet.state_dict())
        self.pipe.text_encoder.load_state_dict(tuned.text_encoder.state_dict())
