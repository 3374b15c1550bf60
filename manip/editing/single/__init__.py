"""Single-image editing methods behind one interface (see `base`)."""
from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from .base import EditOutput, EditRequest, PartCache, SingleImageEditor, TuneConfig, prepare_request
from .baselines import InstructPix2Pix, PromptToPromptEditor
from .imagic import Imagic
from .pix2pix_zero import Pix2PixZero
from .sine import SINE
from .unitune import UniTune

EDITORS: dict[str, type[SingleImageEditor]] = {
    cls.name: cls for cls in (Imagic, UniTune, SINE, Pix2PixZero, PromptToPromptEditor, InstructPix2Pix)
}


def make_config(method: str, settings: dict[str, Any] | None = None):
    """A method's config from plain data (params.yaml, JSON): nested dicts become the nested
    dataclasses (fine-tune settings); unknown keys are refused by name."""
    if method not in EDITORS:
        raise ValueError(f"unknown editing method {method!r}; known: {sorted(EDITORS)}")
    cls = EDITORS[method].Config
    settings = dict(settings or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"{method}: unknown settings {unknown}; known: {sorted(known)}")
    for name, value in settings.items():
        default = known[name].default
        if is_dataclass(default) and isinstance(value, dict):
            settings[name] = type(default)(**value)
    return cls(**settings)


__all__ = ["EDITORS", "EditOutput", "EditRequest", "PartCache", "SingleImageEditor", "TuneConfig", "make_config",
           "prepare_request"]
