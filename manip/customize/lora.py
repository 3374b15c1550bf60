"""LoRA (Hu et al., 2021) on the UNet's attention projections through `peft`: the common
lightweight baseline. The artifact is diffusers' LoRA file, read by `load_lora_weights`.
`lora_alpha` equals the rank, so the loaded adapter's scale is 1 and outputs match exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from .base import Customizer, FitConfig

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraFitConfig(FitConfig):
    lr: float = 1e-3
    rank: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"LoraFitConfig.rank must be >= 1, got {self.rank}")


class Lora(Customizer):
    method = "lora"
    Config = LoraFitConfig
    config: LoraFitConfig

    def _prepare(self):
        self.pipe.unet.add_adapter(LoraConfig(r=self.config.rank, lora_alpha=self.config.rank,
                                              init_lora_weights="gaussian", target_modules=list(TARGETS)))
        # Checkpoints hold the adapters alone, not the frozen UNet around them.
        adapters = torch.nn.ModuleList(m for n, m in self.pipe.unet.named_modules()
                                       if n.endswith((".lora_A", ".lora_B")))
        return adapters, [p for p in adapters.parameters() if p.requires_grad]

    def _finish(self) -> None:
        self.pipe.unet.requires_grad_(False)

    def _save_artifact(self, directory: Path) -> None:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.pipe.unet))
        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)

    def _load_artifact(self, directory: Path) -> None:
        self.pipe.load_lora_weights(directory)
