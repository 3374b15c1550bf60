"""What a customization run learns from: a few reference images of one concept, each with a
caption template that says where the concept's phrase goes.

Reference images arrive in any size and mode; they are normalised here (transparency composited
on white, palettes and greyscale to RGB, centre crop, resize) so every method sees the same
tensor. Problems are raised with the file they come from, before any training starts.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image

DEFAULT_TEMPLATE = "a photo of {}"
MAX_PIXELS = 64_000_000  # larger files are refused rather than decoded (decompression bombs)


class ConceptError(ValueError):
    """Reference data a customization run cannot learn from; the message names the problem."""


@dataclass(frozen=True)
class Concept:
    """One concept to learn.

    `placeholder` is the new token methods that learn an embedding add to the vocabulary (Textual
    Inversion, Custom Diffusion, ELITE); `identifier` is the rare existing token methods that
    only change weights bind to (DreamBooth, LoRA, SVDiff, Cones). `class_noun` is the word the
    base model already draws for the concept's kind: DreamBooth's prior class. `templates` holds
    one caption per image with `{}` where the concept phrase goes."""

    name: str
    images: np.ndarray  # (N, H, W, 3) uint8
    templates: tuple[str, ...]
    class_noun: str
    placeholder: str
    identifier: str = "sks"
    kind: Literal["object", "style"] = "object"
    class_templates: tuple[str, ...] = field(default=())  # captions for prior/regularisation images

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ConceptError(f"concept {self.name!r}: images must be uint8 (N, H, W, 3), got "
                               f"{self.images.dtype} {self.images.shape}")
        if len(self.images) == 0:
            raise ConceptError(f"concept {self.name!r} has no reference images")
        if len(self.templates) != len(self.images):
            raise ConceptError(f"concept {self.name!r}: {len(self.templates)} caption templates for "
                               f"{len(self.images)} images")
        for t in (*self.templates, *self.class_templates):
            if t.count("{}") != 1:
                raise ConceptError(f"concept {self.name!r}: template {t!r} must hold exactly one '{{}}'")
        if not self.placeholder.strip() or not self.class_noun.strip():
            raise ConceptError(f"concept {self.name!r}: placeholder and class noun must be non-empty")

    def captions(self, phrase: str) -> list[str]:
        return [t.format(phrase) for t in self.templates]


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def normalise_image(img: Image.Image, size: int) -> np.ndarray:
    """Centre square crop and resize to `size`: the references' framing matters less than
    every method seeing the same pixels."""
    img = _to_rgb(img)
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8)


def load_reference_images(paths: Sequence[str | Path], size: int) -> np.ndarray:
    """Read and normalise reference images; an empty list, an unreadable file or an oversized one
    is a `ConceptError` naming it."""
    if not paths:
        raise ConceptError("no reference images given: a concept needs at least one")
    out = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConceptError(f"reference image {path} does not exist")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    if img.width * img.height > MAX_PIXELS:
                        raise ConceptError(f"reference image {path} is {img.width}x{img.height}, over the "
                                           f"{MAX_PIXELS} pixel limit")
                    img.load()
                    out.append(normalise_image(img, size))
        except ConceptError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ConceptError(f"reference image {path} cannot be read: {err}") from None
    return np.stack(out)
