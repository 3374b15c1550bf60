"""Stage `elite_encoder`: ELITE's mapping networks (global words, local patch features) trained
once on EmojiWorld's single base-object scenes, so that the `elite` customization method can
encode a new concept from one image with no training. Writes models/elite_encoder (diffusers
`ModelMixin` folder), metrics and the loss curve; checkpoints under checkpoints/elite_encoder.
"""
from __future__ import annotations

from pathlib import Path

from ._runner import main
from .common import publish, require, save_pretrained
from .params import Params, load_params

BASE = Path("models/base")
OUT = Path("models/elite_encoder")
CKPT = Path("checkpoints/elite_encoder")
METRICS = Path("metrics/elite_encoder.json")
PLOT = Path("plots/elite_encoder_loss.csv")


def run(params: Params) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from manip.customize.elite import EncoderConfig, single_object_set, train_encoder
    from manip.runtime import device, set_threads
    from manip.world.dataset import load_split

    set_threads()
    torch.manual_seed(params.seed)
    pipe = StableDiffusionPipeline.from_pretrained(require(BASE / "model_index.json", "unet").parent,
                                                   safety_checker=None, requires_safety_checker=False).to(device())
    images, captions = single_object_set(load_split(require(Path("data/world/train"), "world")))
    cfg = EncoderConfig(**params.customize.elite_encoder.model_dump(), seed=params.seed)
    encoder, report = train_encoder(pipe, images, captions, cfg, CKPT)
    save_pretrained(OUT, encoder.to("cpu"))
    metrics = {"images": len(images), "global_steps": cfg.global_steps, "local_steps": cfg.local_steps,
               "final_loss": round(report.history[-1]["loss"], 5), "train_seconds": report.seconds}
    return publish(metrics, METRICS, {PLOT: report.history})


if __name__ == "__main__":
    main(lambda: run(load_params()))
