"""Stage `text_encoder`: the tokenizer and a CLIP text tower pretrained on base-train captions.

Like Stable Diffusion's frozen CLIP text encoder: contrastive pretraining first, then the UNet
learns on top of frozen text features, which lets it train on a fixed conditioning.
"""
from __future__ import annotations

from pathlib import Path

from transformers import CLIPTextModel

from manip.models.tokenizer import TINY_MAX_LENGTH, build_clip_tokenizer

from ._runner import main
from .clip_common import fit_clip
from .common import publish, save_pretrained
from .params import Params, load_params

TOKENIZER = Path("models/base/tokenizer")
OUT = Path("models/base/text_encoder")
METRICS = Path("metrics/text_encoder.json")
PLOT = Path("plots/text_encoder_loss.csv")


def run(params: Params) -> dict:
    tokenizer = build_clip_tokenizer(max_length=TINY_MAX_LENGTH)
    save_pretrained(TOKENIZER, tokenizer)
    model, history, metrics = fit_clip(params, params.text_encoder, tokenizer, ["train"], params.seed, "text_encoder")
    text = CLIPTextModel(model.config.text_config)
    text.load_state_dict(model.text_model.state_dict())
    save_pretrained(OUT, text)
    return publish(metrics, METRICS, {PLOT: history})


if __name__ == "__main__":
    main(lambda: run(load_params()))
