"""Concept customization: teach a Stable Diffusion pipeline new concepts from a few images.

Every method shares `Customizer`'s interface (`fit`, `generate`, `save`, `load`) and training
loop; `METHODS` maps the names used in params and on the command line to the classes.
"""
from __future__ import annotations

from pathlib import Path

from .base import Customizer, FitConfig, FitReport, PriorSet, read_manifest
from .concept import Concept, ConceptError, load_reference_images
from .cones import Cones
from .custom_diffusion import CustomDiffusion
from .dreambooth import DreamBooth
from .elite import Elite
from .lora import Lora
from .svdiff import SVDiff
from .textual_inversion import TextualInversion

METHODS: dict[str, type[Customizer]] = {
    cls.method: cls for cls in (TextualInversion, DreamBooth, CustomDiffusion, SVDiff, Cones, Lora, Elite)
}


def load_customizer(pipe, directory: str | Path) -> Customizer:
    """Apply any saved customization artifact to `pipe`, whatever the method."""
    method = read_manifest(Path(directory))["method"]
    if method not in METHODS:
        raise ValueError(f"{directory}: unknown customization method {method!r}; known: {sorted(METHODS)}")
    return METHODS[method].load(pipe, directory)


__all__ = ["METHODS", "Concept", "ConceptError", "Customizer", "FitConfig", "FitReport", "PriorSet",
           "load_customizer", "load_reference_images"]
