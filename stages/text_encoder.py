"""Stage `text_encoder`: the tokenizer and a CLIP text tower pretrained on base-train captions.

Like Stable Diffusion's frozen CLIP text encoder: contrastive pretraining first, then the UNet
learns on top of frozen text features, which lets it train on a fixed conditioning.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTextModel

from manip.models.tokenizer import TINY_MAX_LENGTH, build_clip_tokenizer
from manip.training.checkpoint import atomic_write_text, replace_dir, staging_dir

from ._runner import main
from .clip_common import fit_clip
from .common import write_history
from .params import Params, load_params

TOKENIZER = Path("models/base/tokenizer")
OUT = Path("models/base/text_encoder")
METRICS = Path("metrics/text_encoder.json")
PLOT = Path("plots/text_encoder_loss.csv")


def run(params: Params) -> dict:
    tokenizer = build_clip_tokenizer(max_length=TINY_MAX_LENGTH)
    tmp = staging_dir(TOKENIZER)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, TOKENIZER)
    model, history, metrics = fit_clip(params, params.text_encoder, tokenizer, ["train"], params.seed, "text_encoder")
    tmp = staging_dir(OUT)
    text = CLIPTextModel(model.config.text_config)
    text.load_state_dict(model.text_model.state_dict())
    text.save_pretrained(tmp)
    replace_dir(tmp, OUT)
    atomic_write_text(METRICS, json.dumps(metrics, indent=1))
    write_history(PLOT, history)
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main(lambda: run(load_params()))
