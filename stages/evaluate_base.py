"""Stage `evaluate_base`: how well the embedded model draws what it is told.

On test-split captions (object x background pairs never seen in training) it generates
`images_per_caption` samples each, then scores generations, real renders and VAE
reconstructions of the renders with the same judges: attribute accuracy (judge), CLIP-T
(evaluator CLIP) and KID on two feature spaces (the evaluator CLIP's image embedding and the
judge's feature map). The real-vs-real KID beside each is between the test renders and fresh
renders of the same scene descriptions with new placement jitter, one per generated sample: the
generations face a reference set with exactly their captions, so a KID near the real-vs-real
figure means "as close to the renders as other renders of the same captions".
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from manip.metrics.clip_scores import ClipScorer
from manip.metrics.judge import AttributeJudge, attribute_hits, embeddings, objects_in_place, predict
from manip.metrics.kid import kid
from manip.sampling import generate
from manip.runtime import device, set_threads
from manip.training.checkpoint import atomic_write
from manip.training.images import psnr
from manip.training.vae import reconstruct
from manip.world import Artwork, Renderer, resample_layout
from manip.world.dataset import load_split

from ._runner import main
from .common import require
from .params import Params, load_params

BASE, CLIP, JUDGE = Path("models/base"), Path("models/clip"), Path("models/judge")
METRICS = Path("metrics/base.json")
GRID = Path("plots/base_grid.png")


def generator(seed: int, caption: int, sample: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, caption, sample]).integers(2**62)))


def accuracy_table(pred: dict[str, np.ndarray], scenes) -> dict[str, float]:
    """The judge's predictions scored per attribute, and `core`: the foundation's four
    attributes (object, position, background, time of day) all right, every object in its own
    slot; `all` adds colour and style."""
    hits = attribute_hits(pred, scenes)
    hits["core"] = objects_in_place(pred, scenes) & hits["background"] & hits["time"]
    return {k: round(float(v.mean()), 4) for k, v in hits.items()}


def kid_pair(features, gen: np.ndarray, other: np.ndarray, real: np.ndarray) -> dict[str, float]:
    f_gen, f_other, f_real = (features(x) for x in (gen, other, real))
    (g, g_std), (r, r_std) = kid(f_gen, f_real), kid(f_other, f_real)
    return {"generated_vs_real": round(g, 5), "generated_vs_real_std": round(g_std, 5),
            "real_vs_real": round(r, 5), "real_vs_real_std": round(r_std, 5)}


def grid(rows: list[np.ndarray]) -> Image.Image:
    return Image.fromarray(np.concatenate([np.concatenate(list(r), 1) for r in rows], 0))


def run(params: Params) -> dict:
    set_threads()
    e = params.evaluate
    require(BASE / "model_index.json", "unet")
    pipe = StableDiffusionPipeline.from_pretrained(BASE, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device())
    judge = AttributeJudge.from_pretrained(require(JUDGE, "evaluator")).eval().to(device())
    scorer = ClipScorer(CLIP, device=device())
    test = load_split("data/world/test")
    n = min(e.n_captions, len(test))
    scenes, captions = test.scenes[:n], [c[0] for c in test.captions[:n]]
    real = np.asarray(test.images[:n])
    jobs = [(c, s) for c in range(n) for s in range(e.images_per_caption)]
    gens, started = [], time.perf_counter()
    for i in tqdm(range(0, len(jobs), e.batch_size), desc="generate", dynamic_ncols=True):
        chunk = jobs[i : i + e.batch_size]
        gens.append(generate(pipe, [captions[c] for c, _ in chunk], [generator(params.seed, c, s) for c, s in chunk],
                             steps=e.steps, guidance_scale=e.guidance_scale))
    seconds = time.perf_counter() - started
    gen = np.concatenate(gens)
    gen_scenes = [scenes[c] for c, _ in jobs]
    gen_captions = [captions[c] for c, _ in jobs]
    recon = reconstruct(pipe.vae, real)

    renderer = Renderer(Artwork(params.world.artwork_dir), params.world.size)
    other_real = np.stack([renderer.render_array(resample_layout(scenes[c], np.random.default_rng([params.seed, 3, c, s])))
                           for c, s in jobs])
    clip_t_gen = float(scorer.clip_t(gen, gen_captions).mean())
    clip_t_real = float(scorer.clip_t(real, captions).mean())
    metrics = {
        "n_captions": n, "images_per_caption": e.images_per_caption, "steps": e.steps,
        "guidance_scale": e.guidance_scale,
        "generated": accuracy_table(predict(judge, gen), gen_scenes),
        "real": accuracy_table(predict(judge, real), scenes),
        "vae_reconstruction": accuracy_table(predict(judge, recon), scenes),
        "clip_t": {"generated": round(clip_t_gen, 4), "real": round(clip_t_real, 4),
                   "ratio": round(clip_t_gen / clip_t_real, 4)},
        "kid": {"judge_features": kid_pair(lambda x: embeddings(judge, x), gen, other_real, real),
                "clip_features": kid_pair(lambda x: scorer.image_features(x).numpy(), gen, other_real, real)},
        "vae_psnr_db": round(float(psnr(real, recon).mean()), 3),
        "seconds_per_image": round(seconds / len(gen), 4),
    }
    k = e.images_per_caption
    rows = [np.concatenate([real[c : c + 1], recon[c : c + 1], gen[c * k : (c + 1) * k]]) for c in range(min(12, n))]
    GRID.parent.mkdir(parents=True, exist_ok=True)
    tmp = GRID.with_suffix(".tmp.png")
    side = real.shape[1]
    grid(rows).resize((side * (k + 2) * 3, side * len(rows) * 3), Image.NEAREST).save(tmp)
    tmp.replace(GRID)
    atomic_write(Path("plots/base_grid_captions.txt"), "\n".join(captions[: len(rows)]) + "\n")
    atomic_write(METRICS, json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main(lambda: run(load_params()))
