"""Sampling throughput of the embedded model: manip.sampling vs the plain diffusers pipeline.

50-step DDIM, CFG 7.5, batch 8, same prompts and generators; the two run alternately so that
machine drift hits both alike. Writes benchmarks/results/sampling_speed.json.

    python -m benchmarks.sampling_speed [--repeats 3] [--model models/base]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from manip.sampling import generate
from manip.training.checkpoint import atomic_write
from manip.world.dataset import load_split

OUT = Path("benchmarks/results/sampling_speed.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = [c[0] for c in load_split("data/world/test").captions[: args.batch]]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(args.batch)]  # noqa: E731

    def ours() -> np.ndarray:
        return generate(pipe, prompts, gens(), steps=args.steps, guidance_scale=7.5)

    def diffusers_pipe() -> np.ndarray:
        out = pipe(prompt=prompts, generator=gens(), num_inference_steps=args.steps, guidance_scale=7.5,
                   output_type="np").images
        return (out * 255).round().astype(np.uint8)

    ours(), diffusers_pipe()  # warm-up
    times: dict[str, list[float]] = {"manip": [], "diffusers": []}
    for _ in range(args.repeats):
        for name, fn in (("manip", ours), ("diffusers", diffusers_pipe)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    same = int(np.abs(ours().astype(int) - diffusers_pipe().astype(int)).max())
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "batch": args.batch, "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "images_per_second": {k: round(args.batch / v, 3) for k, v in med.items()},
        "seconds_per_batch_median": {k: round(v, 3) for k, v in med.items()},
        "speedup_vs_diffusers": round(med["diffusers"] / med["manip"], 3),
        "max_pixel_difference": same,
    }
    atomic_write(OUT, json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
