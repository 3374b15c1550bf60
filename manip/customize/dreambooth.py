"""DreamBooth (Ruiz et al., 2023): fine-tune the UNet (and optionally the text encoder) on
"a [identifier] [class]" captions, with the class-specific prior preservation loss on class
images the base model generated (pass them as the `prior` of `fit`; weight 1.0 as the paper).

The paper's identifier is a rare word the text encoder knows but that means little. A text
encoder trained on a small vocabulary (the embedded model's) has no such words: an identifier
it never saw reads as almost nothing, the instance captions read as the class captions, and the
prior loss then keeps the identifier from taking the concept at all. So an identifier row this
run had to give a value (`Customizer.bind_identifiers`: a word the encoder never trained) trains
too, at its own rate (`identifier_lr`, as textual inversion trains a token; 0 keeps it fixed),
while the rest of the text encoder stays frozen. Rows the model did train, as every word of a
real Stable Diffusion's vocabulary, stay fixed as the paper has them. With `train_text_encoder`
the rows train with the whole encoder instead.

The artifact is a whole diffusers pipeline folder, loaded with `from_pretrained`; the trained
rows are in its text encoder, and in `identifier-<word>.safetensors` beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from .base import Customizer, FitConfig, identifier_tokens
from .textual_inversion import TrainableRows


@dataclass(frozen=True)
class DreamBoothConfig(FitConfig):
    lr: float = 5e-5
    train_text_encoder: bool = False
    identifier_lr: float = 1e-2  # rows of identifiers the encoder never trained; 0: fixed (module docstring)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.identifier_lr < 0:
            raise ValueError(f"DreamBoothConfig.identifier_lr must be >= 0, got {self.identifier_lr}")


class DreamBooth(Customizer):
    method = "dreambooth"
    Config = DreamBoothConfig
    config: DreamBoothConfig
    _rows: TrainableRows | None = None

    def text_trains(self) -> bool:
        return self.config.train_text_encoder or self._rows is not None

    def _prepare(self):
        modules = {"unet": self.pipe.unet}
        if self.config.train_text_encoder:
            modules["text_encoder"] = self.pipe.text_encoder
        state = torch.nn.ModuleDict(modules)
        state.requires_grad_(True)
        groups = [{"params": list(state.parameters())}]
        ids = [i for word in self.bound_identifiers for i in identifier_tokens(self.pipe.tokenizer, word)]
        if ids and self.config.identifier_lr > 0 and not self.config.train_text_encoder:
            self._rows = state["identifiers"] = TrainableRows(self.pipe.text_encoder.get_input_embeddings(), ids)
            groups.append({"params": [self._rows.rows], "lr_scale": self.config.identifier_lr / self.config.lr})
        return state, groups

    def _finish(self) -> None:
        if self._rows is not None:
            self._rows.commit()
            self._rows = None
        self.pipe.unet.requires_grad_(False)
        self.pipe.text_encoder.requires_grad_(False)

    def _save_artifact(self, directory: Path) -> None:
        self.pipe.save_pretrained(directory)

    def _load_artifact(self, directory: Path) -> None:
        tuned = StableDiffusionPipeline.from_pretrained(directory, safety_checker=None, requires_safety_checker=False)
        self.pipe.unet.load_state_dict(tuned.unet.state_dict())
        self.pipe.text_encoder.load_state_dict(tuned.text_encoder.state_dict())
