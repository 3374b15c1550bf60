"""The two baselines behind the single-image interface: Prompt-to-Prompt through any inversion,
and an InstructPix2Pix model following an instruction."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..benchmark import BenchmarkSettings, caption_edit_config
from ..edit import edit_inverted
from ..inversion import METHODS, Inversion, invert
from .base import EditOutput, EditRequest, SingleImageEditor, _Run


@dataclass(frozen=True)
class PromptToPromptConfig(BenchmarkSettings):
    """The benchmark's Prompt-to-Prompt settings plus the inversion (`batch_size` is unused: one
    image at a time)."""

    inversion: str = "null-text"
    null_text_lr: float = 1e-2  # null-text's initial Adam rate (see `invert_batch`)

    def __post_init__(self) -> None:
        if not self.null_text_lr > 0:
            raise ValueError(f"null_text_lr must be > 0, got {self.null_text_lr}")
        if self.steps < 1:
            raise ValueError(f"p2p steps must be >= 1, got {self.steps}")
        if self.inversion not in METHODS:
            raise ValueError(f"unknown inversion {self.inversion!r}; known: {METHODS}")


class PromptToPromptEditor(SingleImageEditor):
    """The inversion is the cached part: keyed by image and source caption, it serves every
    target caption."""

    name = "p2p"
    version = 2  # 2: null-text keeps the embedding that met the early-stop level
    Config = PromptToPromptConfig
    config: PromptToPromptConfig

    def _edit(self, run: _Run) -> EditOutput:
        r, c = run.request, self.config

        def make(_):
            inv = invert(self.pipe, r.image, r.source, c.inversion, c.steps, c.guidance_scale, c.null_text_inner_steps,
                         lr=c.null_text_lr)
            return {"trajectory": inv.trajectory, "uncond": inv.uncond}

        part = run.part(f"inversion-{c.inversion}", [r.image, r.source, c.inversion, c.steps, c.guidance_scale,
                                                     c.null_text_inner_steps, c.null_text_lr], make)
        height, width = r.image.shape[:2]
        inv = Inversion(c.inversion, r.source, c.steps, c.guidance_scale, part["trajectory"], part["uncond"],
                        self.model, height, width)
        config = caption_edit_config(r.source, r.target, c.cross_replace, c.self_replace, c.local_blend,
                                     c.blend_threshold, c.blend_start)
        images = edit_inverted(self.pipe, inv, [r.target], config)
        return run.output(images[1], images[0])


@dataclass(frozen=True)
class InstructPix2PixConfig:
    steps: int = 100  # the paper's sampler settings; the stages run 50 on CPUs (params.yaml)
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"instruct-pix2pix steps must be >= 1, got {self.steps}")


class InstructPix2Pix(SingleImageEditor):
    """`pipe` is a `StableDiffusionInstructPix2PixPipeline`; it edits in one pass and keeps nothing."""

    name = "instruct-pix2pix"
    Config = InstructPix2PixConfig
    config: InstructPix2PixConfig

    def prompts(self, request: EditRequest) -> list[str]:
        if not request.instruction:
            raise ValueError("instruct-pix2pix edits by instruction: the request has none")
        return [request.instruction]

    @torch.inference_mode()
    def _edit(self, run: _Run) -> EditOutput:
        r, c = run.request, self.config
        out = self.pipe(prompt=r.instruction, image=Image.fromarray(r.image), num_inference_steps=c.steps,
                        guidance_scale=c.guidance_scale, image_guidance_scale=c.image_guidance_scale,
                        generator=torch.Generator().manual_seed(r.seed), output_type="np").images[0]
        return run.output((out * 255).round().astype(np.uint8), None)
