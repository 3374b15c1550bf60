"""The fast inversions against DDIM and null-text, all ours (the community pipelines have no
negative-prompt or direct inversion): seconds of inversion + the same Prompt-to-Prompt replace
edit, and reconstruction of the input. The target: a fast inversion within 1 dB of null-text's
reconstruction at no more than 1.5x the seconds of DDIM inversion + edit.

The same model, EmojiWorld test renders and edits as `benchmarks.edit_speed` (50 steps,
guidance 7.5, null-text with 10 inner steps, cross-attention replaced for 80% of the steps,
self-attention for 40%), one image at a time, the four methods in an order that flips every
image so that machine drift hits them alike. Reconstruction is the edit's source branch against
the input. Writes benchmarks/results/fast_inversion_speed.json.

    python -m benchmarks.fast_inversion_speed [--images 8] [--model models/base] [--world data/world]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path("benchmarks/results/fast_inversion_speed.json")
METHODS = ("ddim", "null-text", "negative-prompt", "direct")
FAST = ("negative-prompt", "direct")
STEPS, GUIDANCE, INNER = 50, 7.5, 10
CROSS, SELF = 0.8, 0.4


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--world", default="data/world", help="EmojiWorld folder with a test split")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="which test scenes and edits are drawn")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers import StableDiffusionPipeline

    from manip.editing.benchmark import build_cases
    from manip.editing.edit import edit_inverted
    from manip.editing.images import load_image
    from manip.editing.inversion import invert
    from manip.editing.p2p import P2PConfig
    from manip.metrics.image_quality import psnr
    from manip.runtime import set_threads
    from manip.training.checkpoint import atomic_write
    from manip.world.dataset import load_split

    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        print(f"error: {model} is not a diffusers pipeline folder (no model_index.json)", file=sys.stderr)
        return 2
    set_threads()
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    test = load_split(Path(args.world) / "test")
    cases = build_cases(test.scenes, args.seed, args.images, kinds=("object",))
    images = [load_image(np.asarray(test.images[c.index]), size)[0] for c in cases]
    config = P2PConfig(edit="replace", cross_replace=CROSS, self_replace=SELF)

    def run(method: str, image: np.ndarray, source: str, target: str) -> tuple[float, float]:
        started = time.perf_counter()
        inv = invert(pipe, image, source, method, steps=STEPS, guidance_scale=GUIDANCE, inner_steps=INNER)
        out = edit_inverted(pipe, inv, [target], config)
        return time.perf_counter() - started, psnr(out[0], image)

    run("ddim", images[0], cases[0].source_caption, cases[0].target_caption)  # warm-up, not recorded
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    recon: dict[str, list[float]] = {m: [] for m in METHODS}
    for i, (case, image) in enumerate(zip(cases, images)):
        for method in METHODS if i % 2 == 0 else METHODS[::-1]:
            s, p = run(method, image, case.source_caption, case.target_caption)
            seconds[method].append(s)
            recon[method].append(p)
    median = {m: statistics.median(v) for m, v in seconds.items()}
    psnr_mean = {m: float(np.mean(v)) for m, v in recon.items()}
    methods = {m: {"seconds_median": round(median[m], 3), "over_ddim": round(median[m] / median["ddim"], 3),
                   "recon_psnr": round(psnr_mean[m], 3),
                   "below_null_text_db": round(psnr_mean["null-text"] - psnr_mean[m], 3)} for m in METHODS}
    for m in FAST:
        methods[m]["meets_target"] = (median[m] / median["ddim"] <= 1.5
                                      and psnr_mean["null-text"] - psnr_mean[m] <= 1.0)
    result = {
        "model": str(model), "image_size": size, "steps": STEPS, "inner_steps": INNER, "guidance_scale": GUIDANCE,
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "cases": [{"case_id": c.case_id, "source": c.source_caption, "target": c.target_caption} for c in cases],
        "methods": methods,
    }
    atomic_write(Path(args.out), json.dumps(result, indent=1))
    print(json.dumps(methods, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
