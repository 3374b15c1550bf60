"""Stage `train_unet`: the denoiser on frozen VAE latents and text features; writes
models/base/unet, the sampling scheduler and model_index.json, completing the pipeline."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from manip.models.factory import make_unet
from manip.models.schedulers import sampling_scheduler, training_scheduler
from manip.training.checkpoint import atomic_write_text, replace_dir, staging_dir
from manip.training.unet import encode_latents, train_unet
from manip.world.dataset import load_split

from ._runner import main
from .common import fingerprint, loop_config, require, write_history
from .params import Params, load_params

BASE = Path("models/base")
CKPT = Path("checkpoints/unet")
PLOT = Path("plots/unet_loss.csv")
METRICS = Path("metrics/unet.json")


def run(params: Params) -> dict:
    p = params.unet
    torch.manual_seed(params.seed)
    vae = AutoencoderKL.from_pretrained(require(BASE / "vae", "vae")).eval()
    text_encoder = CLIPTextModel.from_pretrained(require(BASE / "text_encoder", "text_encoder")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(require(BASE / "tokenizer", "text_encoder"))
    train_split = load_split("data/world/train")
    latents = encode_latents(vae, train_split.images)
    unet = make_unet(p.block_out_channels, p.layers_per_block, p.attention_head_dim,
                     text_encoder.config.hidden_size, vae.config.latent_channels, latents.shape[-1])
    result = train_unet(unet, training_scheduler(), text_encoder, tokenizer, latents, train_split.captions,
                        loop_config(p.train), p.train.batch_size, p.uncond_prob, params.seed, CKPT, fingerprint(p, params.seed))
    scheduler = sampling_scheduler()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=result.model,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for name, component in (("unet", result.model), ("scheduler", scheduler)):
        tmp = staging_dir(BASE / name)
        component.save_pretrained(tmp)
        replace_dir(tmp, BASE / name)
    pipe.save_config(BASE)
    metrics = {"final_loss": round(result.history[-1]["loss"], 5), "steps": p.train.steps,
               "parameters_m": round(sum(x.numel() for x in unet.parameters()) / 1e6, 3)}
    atomic_write_text(METRICS, json.dumps(metrics, indent=1))
    write_history(PLOT, result.history)
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main(lambda: run(load_params()))
