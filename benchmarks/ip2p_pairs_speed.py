"""Kept InstructPix2Pix pairs per second and per model evaluation: filtering while sampling (stop
an edit once `max_out_samples` pass) against the original algorithm (draw all `n_samples`, then
filter and keep the best), on the same base model, CLIP, caption edits, thresholds and batch
code, in the same run. Writes benchmarks/results/ip2p_pairs_speed.json.

Both keep the same number of pairs per edit (the first `max_out_samples` that pass, or all that
pass when fewer do); the original chooses the best by directional similarity among all passes,
so the mean directional similarity of the kept pairs is reported too.

    python -m benchmarks.ip2p_pairs_speed [--edits 4] [--n-samples 100] [--model models/base]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from manip.ip2p import RulesEditor, world_captions
from manip.ip2p.clip_filter import PROFILES
from manip.ip2p.pairs import PairSettings, ShardResult, synthesize
from manip.metrics.clip_scores import ClipScorer
from manip.training.checkpoint import atomic_write
from manip.world.dataset import load_split

OUT = Path("benchmarks/results/ip2p_pairs_speed.json")


def summary(r: ShardResult) -> dict:
    kept = len(r.kept)
    return {"kept_pairs": kept, "tries": len(r.tries), "unet_images": r.unet_images, "seconds": round(r.seconds, 2),
            "kept_per_second": round(kept / r.seconds, 4),
            "kept_per_1000_images": round(1000 * kept / max(1, r.unet_images), 2),
            "pass_rate": round(sum(t["passed"] for t in r.tries) / max(1, len(r.tries)), 3),
            "mean_clip_direction_kept": round(float(np.mean([k["clip_direction"] for k in r.kept])), 4) if kept else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--clip", default="models/clip")
    ap.add_argument("--edits", type=int, default=4)
    ap.add_argument("--n-samples", type=int, default=100)
    ap.add_argument("--max-out-samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--profile", default="emojiworld", choices=sorted(PROFILES))
    args = ap.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    scorer = ClipScorer(args.clip)
    captions = world_captions(load_split("data/world/val").scenes, 0, args.edits, prefix="bench")
    edits, _ = RulesEditor(0).edit_all(captions)
    s = PairSettings(steps=args.steps, n_samples=args.n_samples, max_out_samples=args.max_out_samples,
                     batch_size=args.batch_size, thresholds=PROFILES[args.profile])
    synthesize(pipe, scorer, edits[:1], 0, PairSettings(steps=2, n_samples=1, max_out_samples=1))  # warm-up
    ours = summary(synthesize(pipe, scorer, edits, 0, s, early_stop=True, progress=True))
    original = summary(synthesize(pipe, scorer, edits, 0, s, early_stop=False, progress=True))
    result = {
        "edits": len(edits), "settings": {k: v for k, v in vars(args).items()}, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "ours": ours, "original_algorithm": original,
        "speedup_kept_per_second": round(ours["kept_per_second"] / original["kept_per_second"], 2)
        if original["kept_per_second"] else None,
        "speedup_kept_per_image": round(ours["kept_per_1000_images"] / original["kept_per_1000_images"], 2)
        if original["kept_per_1000_images"] else None,
    }
    atomic_write(OUT, json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
