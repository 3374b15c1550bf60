"""Stage `train_unet`: the denoiser on frozen VAE latents and text features; writes
models/base/unet, the sampling scheduler and model_index.json, completing the pipeline."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from diffusers import AutoencoderKL, StableDiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from manip.models.factory import make_unet
from manip.runtime import device
from manip.models.schedulers import sampling_scheduler, training_scheduler
from manip.training.unet import encode_latents, train_unet
from manip.world.dataset import load_split

from ._runner import main
from .common import fingerprint, loop_config, publish, require, save_pretrained
from .params import Params, load_params

BASE = Path("models/base")
CKPT = Path("checkpoints/unet")
PLOT = Path("plots/unet_loss.csv")
METRICS = Path("metrics/unet.json")


def cached_latents(vae: AutoencoderKL, images, path: Path) -> torch.Tensor:
    """Encode the training set once per VAE; a resumed run reads the cache back."""
    key = hashlib.sha256((BASE / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if f.metadata() == {"vae": key, "n": str(len(images))}:
                return f.get_tensor("latents")
    latents = encode_latents(vae, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"latents": latents.cpu().contiguous()}, str(tmp), metadata={"vae": key, "n": str(len(images))})
    tmp.replace(path)
    return latents


def run(params: Params) -> dict:
    p = params.unet
    torch.manual_seed(params.seed)
    vae = AutoencoderKL.from_pretrained(require(BASE / "vae", "vae")).eval().to(device())
    text_encoder = CLIPTextModel.from_pretrained(require(BASE / "text_encoder", "text_encoder")).eval().to(device())
    tokenizer = CLIPTokenizer.from_pretrained(require(BASE / "tokenizer", "text_encoder"))
    train_split = load_split("data/world/train")
    latents = cached_latents(vae, train_split.images, CKPT / "latents.safetensors").to(device())
    unet = make_unet(p.block_out_channels, p.layers_per_block, p.attention_head_dim,
                     text_encoder.config.hidden_size, vae.config.latent_channels, latents.shape[-1]).to(device())
    result = train_unet(unet, training_scheduler(), text_encoder, tokenizer, latents, train_split.captions,
                        loop_config(p.train), p.train.batch_size, p.uncond_prob, params.seed, CKPT, fingerprint(p, params.seed))
    scheduler = sampling_scheduler()
    vae, text_encoder, unet = vae.cpu(), text_encoder.cpu(), result.model.cpu()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    save_pretrained(BASE / "unet", result.model)
    save_pretrained(BASE / "scheduler", scheduler)
    pipe.save_config(BASE)
    metrics = {"final_loss": round(result.history[-1]["loss"], 5), "steps": p.train.steps,
               "train_seconds": result.seconds,
               "parameters_m": round(sum(x.numel() for x in unet.parameters()) / 1e6, 3)}
    return publish(metrics, METRICS, {PLOT: result.history})


if __name__ == "__main__":
    main(lambda: run(load_params()))
