"""Stage `train_vae`: train the autoencoder on train-split renders; save models/base/vae."""
from __future__ import annotations

from pathlib import Path

import torch

from manip.models.factory import make_vae
from manip.training.vae import latent_scale, test_psnr, train_vae
from manip.world.dataset import load_split

from ._runner import main
from .common import fingerprint, loop_config, publish, save_pretrained
from .params import Params, load_params

OUT = Path("models/base/vae")
CKPT = Path("checkpoints/vae")
METRICS = Path("metrics/vae.json")
PLOT = Path("plots/vae_loss.csv")


def run(params: Params) -> dict:
    p = params.vae
    torch.manual_seed(params.seed)
    train_split = load_split("data/world/train")
    vae = make_vae(p.block_out_channels, p.layers_per_block, p.latent_channels, p.norm_num_groups, params.world.size)
    result = train_vae(vae, train_split.images, loop_config(p.train), p.train.batch_size, p.crop, p.kl_weight,
                       params.seed, CKPT, fingerprint(p, params.seed))
    final = result.model
    final.register_to_config(scaling_factor=latent_scale(final, train_split.images))
    test = load_split("data/world/test")
    metrics = {"test_psnr_db": round(test_psnr(final, test.images), 3),
               "scaling_factor": round(final.config.scaling_factor, 5), "train_seconds": result.seconds,
               "parameters_m": round(sum(x.numel() for x in final.parameters()) / 1e6, 3)}
    save_pretrained(OUT, final)
    return publish(metrics, METRICS, {PLOT: result.history})


if __name__ == "__main__":
    main(lambda: run(load_params()))
