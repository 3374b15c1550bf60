"""What a customization run learns from: a few reference images of one concept, each with a
caption template that says where the concept's phrase goes.

Reference images arrive in any size and mode; they are normalised on loading (transparency
composited on white, palettes and greyscale to RGB, centre crop, resize) so every method sees the
same tensor. Problems are raised with the file they come from, before any training starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from manip.editing.images import ImageInputError, load_image
from manip.multilingual.language import Language


class ConceptError(ValueError):
    """Reference data a customization run cannot learn from; the message names the problem."""


@dataclass(frozen=True)
class Concept:
    """One concept to learn.

    `placeholder` is the new token methods that learn an embedding add to the vocabulary (Textual
    Inversion, Custom Diffusion, ELITE); `identifier` is the rare existing token methods that
    only change weights bind to (DreamBooth, LoRA, SVDiff, Cones); both name the concept in a
    prompt of any language. `class_noun` is the word the base model already draws for the
    concept's kind: DreamBooth's prior class; `class_noun_ru` is that word in Russian, for
    Russian prompts on a multilingual model. `templates` holds one caption per image, in either
    language, with `{}` where the concept phrase goes."""

    name: str
    images: np.ndarray  # (N, H, W, 3) uint8
    templates: tuple[str, ...]
    class_noun: str
    placeholder: str
    identifier: str = "sks"
    kind: Literal["object", "style"] = "object"
    class_templates: tuple[str, ...] = field(default=())  # captions for prior/regularisation images
    class_noun_ru: str | None = None

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

    def noun(self, language: Language) -> str:
        """The class noun in a prompt's language."""
        if language == "en":
            return self.class_noun
        if not self.class_noun_ru:
            raise ConceptError(f"concept {self.name!r} has no Russian class noun (class_noun_ru) for a Russian prompt")
        return self.class_noun_ru


def load_reference_images(paths: Sequence[str | Path], size: int) -> np.ndarray:
    """Read and normalise reference images as the editing tools read user images (EXIF
    orientation, modes, centre crop, resize); an empty list, a missing, unreadable or oversized
    file is a `ConceptError` naming it."""
    if not paths:
        raise ConceptError("no reference images given: a concept needs at least one")
    out = []
    for path in paths:
        try:
            out.append(load_image(Path(path), size)[0])
        except ImageInputError as err:
            raise ConceptError(f"reference image: {err}") from None
    return np.stack(out)
