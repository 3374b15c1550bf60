"""Training throughput of the embedded base UNet (params.yaml's architecture and batch) on this
machine's device: what a `train_unet` run costs on a workstation's CPU and on a GPU worker.

Random weights and synthetic latents and text features of the real shapes, the real loss
(`diffusion_loss`, min-SNR weighted) and AdamW; a few warm-up steps, then timed ones. Writes
benchmarks/results/unet_train_speed_<device>.json.

    python -m benchmarks.unet_train_speed [--steps 50] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from manip.models.factory import make_unet
from manip.models.schedulers import training_scheduler
from manip.runtime import device as default_device
from manip.training.checkpoint import atomic_write
from manip.training.unet import diffusion_loss
from stages.params import load_params

RESULTS = Path("benchmarks/results")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default=None, help="default: MANIP_DEVICE, else CUDA when present")
    args = ap.parse_args()
    dev = torch.device(args.device) if args.device else default_device()
    params = load_params()
    p, v = params.unet, params.vae
    side = params.world.size // 2 ** (len(v.block_out_channels) - 1)
    unet = make_unet(p.block_out_channels, p.layers_per_block, p.attention_head_dim,
                     params.text_encoder.hidden_size, v.latent_channels, side).to(dev)
    opt = torch.optim.AdamW(unet.parameters(), lr=p.train.lr)
    scheduler = training_scheduler()
    gen = torch.Generator().manual_seed(0)
    batch = p.train.batch_size
    latents = torch.randn(batch, v.latent_channels, side, side, generator=gen).to(dev)
    tokens = json.loads(Path("models/base/tokenizer/tokenizer_config.json").read_text())["model_max_length"]
    context = torch.randn(batch, tokens, params.text_encoder.hidden_size, generator=gen).to(dev)

    def step() -> None:
        loss = diffusion_loss(unet, scheduler, latents, context, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    sync(dev)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(dev)
    seconds = time.perf_counter() - started
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "python": platform.python_version(),
        "architecture": {"block_out_channels": p.block_out_channels, "latent": [v.latent_channels, side, side],
                         "parameters_m": round(sum(x.numel() for x in unet.parameters()) / 1e6, 2)},
        "batch_size": batch, "timed_steps": args.steps,
        "steps_per_second": round(args.steps / seconds, 2),
        "samples_per_second": round(args.steps * batch / seconds, 1),
        "hours_for_configured_steps": round(p.train.steps / (args.steps / seconds) / 3600, 3),
    }
    out = RESULTS / f"unet_train_speed_{dev.type}.json"
    atomic_write(out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
