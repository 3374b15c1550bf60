"""The multilingual model as a diffusers `StableDiffusionPipeline` folder.

Its own tokenizer, text encoder, scheduler config and model_index.json; `unet` and `vae` are
relative symlinks to the base model's (`../base/unet`), which the student was distilled against
and which it leaves unchanged, so the UNet is stored once. `from_pretrained` reads through the
links; copy the folder with `cp -rL` to take it away from its base model.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers import CLIPTokenizer, PreTrainedModel

from manip.training.checkpoint import atomic_write, replace_dir, staging_dir

from .tokenizer import save_bilingual_tokenizer

LINKED = ("unet", "vae")


def save_multilingual_pipeline(folder: Path, base: Path, tokenizer: CLIPTokenizer,
                               text_encoder: PreTrainedModel) -> None:
    """Write the pipeline folder whole or not at all. `base` is the pipeline folder the links
    point into; its model_index.json is kept, but for the text encoder's class."""
    index = json.loads((base / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", type(text_encoder).__name__]
    tmp = staging_dir(folder)
    save_bilingual_tokenizer(tokenizer, tmp / "tokenizer")
    text_encoder.save_pretrained(tmp / "text_encoder")
    shutil.copytree(base / "scheduler", tmp / "scheduler")
    here = folder.parent.resolve() / folder.name
    for name in LINKED:
        (tmp / name).symlink_to(os.path.relpath(base.resolve() / name, here), target_is_directory=True)
    atomic_write(tmp / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
    replace_dir(tmp, folder)
