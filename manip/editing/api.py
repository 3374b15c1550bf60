"""Real-image editing from Python under the command line's names and defaults: `invert_image` is
`manip invert`, `edit_image` is `manip edit` (Prompt-to-Prompt). The CLI is a thin shell over
these two, so a notebook and a shell script that pass the same values get the same pixels.

Every input is checked before the minutes of inversion start: the image (any file, PIL image or
array, converted and fitted with a note), the prompts (empty, too long, words that do not align),
the edit settings, and an inversion artifact reused with `from_inversion` (its model, size,
image, caption, method, steps and guidance must be the ones asked for; left out, they are the
artifact's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from manip.prompts import read_prompts
from manip.runtime import device

from . import INVERSION_DEFAULTS
from .attention import AttentionStore
from .edit import edit_inverted
from .heatmaps import Unit, render_heatmaps
from .images import fit, load_image, model_size, parse_size
from .inversion import Inversion, check_size, encode_image, image_digest, invert, native_size, size_multiple
from .p2p import EditKind, P2PConfig, PromptToPrompt

ImageInput = str | Path | Image.Image | np.ndarray


def load_pipeline(model: str | Path | StableDiffusionPipeline) -> StableDiffusionPipeline:
    """A diffusers Stable Diffusion folder, loaded on the working device; a pipeline passes through."""
    if isinstance(model, StableDiffusionPipeline):
        return model
    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device())


def working_size(pipe: StableDiffusionPipeline, size: str | None, image: np.ndarray) -> tuple[int, int]:
    """(height, width) that `size` names for this image and model: auto (None too) is the image's
    aspect ratio at about the model's pixel count, square the model's native square, or WIDTHxHEIGHT."""
    native = native_size(pipe)
    if size in (None, "auto"):
        return model_size(image.shape[1], image.shape[0], native, size_multiple(pipe))
    if size == "square":
        return native, native
    try:
        height, width = parse_size(size)
    except ValueError as err:
        raise ValueError(f"size takes auto, square or WIDTHxHEIGHT: {err}") from None
    check_size(pipe, height, width, f"size {size}")
    return height, width


@dataclass
class _Request:
    """Checked inputs: the image at its working size, the prompts as the encoder reads them, and
    the inversion settings (an artifact's when one is reused)."""

    image: np.ndarray
    notes: list[str]
    prompts: list[str]
    method: str
    steps: int
    guidance: float
    reused: Inversion | None


def _request(pipe: StableDiffusionPipeline, image: ImageInput, source: str, targets: Sequence[str],
             inversion: str | None, steps: int | None, guidance: float | None, size: str | None,
             from_inversion: str | Path | Inversion | None) -> _Request:
    reused = (from_inversion if isinstance(from_inversion, Inversion) or from_inversion is None
              else Inversion.load(from_inversion))
    given = {"inversion": inversion, "steps": steps, "guidance": guidance}
    if reused is None:
        settings = {k: INVERSION_DEFAULTS[k] if v is None else v for k, v in given.items()}
    else:
        reused.check(pipe)
        settings = {"inversion": reused.method, "steps": reused.steps, "guidance": reused.guidance_scale}
        for name, value in given.items():
            if value is not None and value != settings[name]:
                raise ValueError(f"{name} {value} differs from the inversion artifact's {settings[name]}: "
                                 "leave it out or invert again")
    array, notes = load_image(image, None)
    if reused is None:
        height, width = working_size(pipe, size, array)
    else:  # the artifact's size; a size that names another is refused
        height, width = reused.height, reused.width
        if size:
            reused.check(pipe, *working_size(pipe, size, array))
    array, resized = fit(array, (height, width))
    prompts = [source, *targets]
    if any(not p.strip() for p in prompts):
        raise ValueError("prompts must not be empty")
    prompts = read_prompts(pipe.tokenizer, prompts)
    if reused is not None:
        if prompts[0] != reused.prompt:
            raise ValueError(f"source {prompts[0]!r} is not the caption the inversion artifact was made with "
                             f"({reused.prompt!r}): the edit's source branch reconstructs the artifact's")
        same = (reused.image_digest == image_digest(array) if reused.image_digest  # older artifacts: latents
                else torch.allclose(encode_image(pipe, array).cpu(), reused.trajectory[:1], atol=1e-3))
        if not same:
            raise ValueError("image is not the image the inversion artifact was made from")
    return _Request(array, notes + resized, prompts, settings["inversion"], settings["steps"], settings["guidance"],
                    reused)


def _invert(pipe: StableDiffusionPipeline, req: _Request, inner_steps: int, null_text_lr: float,
            progress: bool) -> Inversion:
    if req.reused is not None:
        return req.reused
    inv = invert(pipe, req.image, req.prompts[0], req.method, req.steps, req.guidance, inner_steps,
                 progress=progress, lr=null_text_lr)
    inv.notes = req.notes
    return inv


def invert_image(model: str | Path | StableDiffusionPipeline, image: ImageInput, source: str, *,
                 inversion: str | None = None, steps: int | None = None, guidance: float | None = None,
                 inner_steps: int = 10, null_text_lr: float = 1e-2, size: str | None = None,
                 out: str | Path | None = None, progress: bool = False) -> Inversion:
    """Invert an image under its caption (`manip invert`); the artifact's notes say how the image
    was converted or resized. With `out`, the artifact is also written there."""
    pipe = load_pipeline(model)
    inv = _invert(pipe, _request(pipe, image, source, [], inversion, steps, guidance, size, None),
                  inner_steps, null_text_lr, progress)
    if out is not None:
        inv.save(out)
    return inv


@dataclass
class EditResult:
    edits: list[np.ndarray]  # uint8 HxWx3, one per target
    reconstruction: np.ndarray  # the source branch: the input as the inversion gives it back
    inversion: Inversion
    notes: list[str] = field(default_factory=list)
    heatmaps: Image.Image | None = None  # cross-attention of every prompt's words or tokens, when asked for


def edit_image(model: str | Path | StableDiffusionPipeline, image: ImageInput, source: str,
               target: str | Sequence[str], *, edit: EditKind = "replace", inversion: str | None = None,
               steps: int | None = None, guidance: float | None = None, inner_steps: int = 10,
               null_text_lr: float = 1e-2, size: str | None = None, reweight: dict[str, float] | None = None,
               blend_source: Sequence[str] = (), blend_target: Sequence[str] = (), blend_threshold: float = 0.3,
               blend_start: float = 0.2, cross_replace: float = 0.8, self_replace: float = 0.4,
               self_max_pixels: int | None = None, from_inversion: str | Path | Inversion | None = None,
               heatmaps: bool = False, heatmap_unit: Unit = "word", progress: bool = False) -> EditResult:
    """Edit a real image with Prompt-to-Prompt (`manip edit`): invert it (or reuse
    `from_inversion`), then sample [source, *targets] with the attention edit. Local blending
    is on when `blend_source` or `blend_target` names words."""
    pipe = load_pipeline(model)
    targets = [target] if isinstance(target, str) else list(target)
    if not targets:
        raise ValueError("edit_image needs at least one target caption")
    req = _request(pipe, image, source, targets, inversion, steps, guidance, size, from_inversion)
    blend = (list(blend_source), list(blend_target)) if blend_source or blend_target else None
    config = P2PConfig(edit=edit, cross_replace=cross_replace, self_replace=self_replace,
                       self_max_pixels=self_max_pixels, reweight=dict(reweight or {}), blend_words=blend,
                       blend_threshold=blend_threshold, blend_start=blend_start)
    # Words that do not align fail here, before minutes of inversion, not after.
    PromptToPrompt(pipe.tokenizer, req.prompts, req.steps, config, guided=req.guidance != 1.0)
    inv = _invert(pipe, req, inner_steps, null_text_lr, progress)
    store = AttentionStore(guided=inv.guidance_scale != 1.0) if heatmaps else None
    images = edit_inverted(pipe, inv, req.prompts[1:], config, record=store)
    maps = render_heatmaps(store, pipe.tokenizer, req.prompts, images, unit=heatmap_unit) if store is not None else None
    return EditResult(list(images[1:]), images[0], inv, req.notes, maps)
