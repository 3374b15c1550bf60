"""Stage `evaluate_multilingual`: does a Russian prompt draw what its English twin draws?

For the first `n_scenes` test-split scenes (compositions never seen in training) it generates
`images_per_scene` samples per scene under three conditions with the same seeds: the base model
on the English caption, the multilingual model on the English caption and on the Russian one.
Each is scored as `evaluate_base` scores the base model: attribute accuracy by the judge and
CLIP-T by the evaluator CLIP, always against the English caption (the evaluator reads English
only). Reported: every condition's scores, Russian minus English in points for both English
references and whether each is within 5 points, and cross-lingual consistency: the evaluator's
image-image cosine between the English-prompt and Russian-prompt samples of the same seed, beside
the same figure between two English samples of another seed (what "the same content" looks like
when only the seed differs) and between the base and multilingual English samples of a seed.

A stage of its own, not part of `multilingual`: sampling three conditions is most of the cost
and runs on the GPU worker when one is free, and new evaluation settings must not retrain.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from diffusers import StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from manip.metrics.clip_scores import ClipScorer
from manip.metrics.judge import AttributeJudge, predict
from manip.multilingual import caption_ru
from manip.runtime import device, set_threads
from manip.sampling import generate
from manip.training.checkpoint import atomic_write
from manip.world.dataset import load_split

from ._runner import main
from .common import require
from .evaluate_base import accuracy_table, generator, grid
from .params import MultilingualEvalParams, Params, load_params

BASE, MULTILINGUAL = Path("models/base"), Path("models/multilingual")
CLIP, JUDGE = Path("models/clip"), Path("models/judge")
METRICS = Path("metrics/multilingual_eval.json")
GRID = Path("plots/multilingual_grid.png")
CAPTIONS = Path("plots/multilingual_grid_captions.txt")
# condition -> (model, prompt language)
CONDITIONS = {"base_en": (BASE, "en"), "multilingual_en": (MULTILINGUAL, "en"), "multilingual_ru": (MULTILINGUAL, "ru")}
COMPARED = ("object", "background", "all", "clip_t")
TOLERANCE_POINTS = 5.0


def sample(pipe, prompts: list[str], jobs: list[tuple[int, int]], seed: int, e: MultilingualEvalParams,
           desc: str) -> np.ndarray:
    """One image per (scene, sample) job, the scene's prompt, the seed of (seed, scene, sample)."""
    out = []
    for i in tqdm(range(0, len(jobs), e.batch_size), desc=desc, dynamic_ncols=True):
        chunk = jobs[i : i + e.batch_size]
        out.append(generate(pipe, [prompts[c] for c, _ in chunk], [generator(seed, c, s) for c, s in chunk],
                            steps=e.steps, guidance_scale=e.guidance_scale))
    return np.concatenate(out)


def differences(scores: dict[str, dict[str, float]], reference: str) -> dict[str, dict]:
    """Russian minus English, in points (accuracy and cosine times 100)."""
    ru, en = scores["multilingual_ru"], scores[reference]
    diff = {k: round(100 * (ru[k] - en[k]), 2) for k in COMPARED}
    return {"ru_minus_en_points": diff, "within_5_points": {k: abs(v) <= TOLERANCE_POINTS for k, v in diff.items()}}


def other_seed(jobs: list[tuple[int, int]], per_scene: int) -> np.ndarray:
    """For every job, the index of the same scene's next sample."""
    return np.array([c * per_scene + (s + 1) % per_scene for c, s in jobs])


def run(params: Params) -> dict:
    set_threads()
    e = params.multilingual.evaluate
    test = load_split(require(Path("data/world/test"), "world"))
    n = min(e.n_scenes, len(test))
    scenes = test.scenes[:n]
    prompts = {"en": [c[0] for c in test.captions[:n]], "ru": [caption_ru(scene) for scene in scenes]}
    pipes = {}
    for path, stage in ((BASE, "unet"), (MULTILINGUAL, "multilingual")):
        pipes[path] = StableDiffusionPipeline.from_pretrained(require(path / "model_index.json", stage).parent,
                                                              safety_checker=None, requires_safety_checker=False)
        pipes[path].set_progress_bar_config(disable=True)
        pipes[path].to(device())
    judge = AttributeJudge.from_pretrained(require(JUDGE, "evaluator")).eval().to(device())
    scorer = ClipScorer(require(CLIP, "evaluator"), device=device())

    jobs = [(c, s) for c in range(n) for s in range(e.images_per_scene)]
    started = time.perf_counter()
    images = {name: sample(pipes[model], prompts[language], jobs, params.seed, e, name)
              for name, (model, language) in CONDITIONS.items()}
    seconds = time.perf_counter() - started
    job_scenes, job_english = [scenes[c] for c, _ in jobs], [prompts["en"][c] for c, _ in jobs]
    scores = {name: {**accuracy_table(predict(judge, gen), job_scenes),
                     "clip_t": round(float(scorer.clip_t(gen, job_english).mean()), 4)}
              for name, gen in images.items()}

    def similarity(a: np.ndarray, b: np.ndarray) -> float:
        return round(float(scorer.clip_i(a, b).mean()), 4)

    en, ru = images["multilingual_en"], images["multilingual_ru"]
    metrics = {
        "seed": params.seed, "n_scenes": n, "images_per_scene": e.images_per_scene, "steps": e.steps,
        "guidance_scale": e.guidance_scale,
        "scores": scores,
        "vs_multilingual_en": differences(scores, "multilingual_en"),
        "vs_base_en": differences(scores, "base_en"),
        "consistency": {
            "en_vs_ru_same_seed": similarity(en, ru),
            "en_vs_en_other_seed": similarity(en, en[other_seed(jobs, e.images_per_scene)]),
            "base_en_vs_multilingual_en_same_seed": similarity(images["base_en"], en),
        },
        "seconds_per_image": round(seconds / (len(jobs) * len(CONDITIONS)), 4),
    }
    shown = range(min(12, n))
    first = [c * e.images_per_scene for c in shown]  # each scene's first sample, one column per condition
    GRID.parent.mkdir(parents=True, exist_ok=True)
    tmp = GRID.with_suffix(".tmp.png")
    side = en.shape[1]
    grid([np.stack([images[name][i] for name in CONDITIONS]) for i in first]).resize(
        (side * len(CONDITIONS) * 3, side * len(first) * 3), Image.NEAREST).save(tmp)
    tmp.replace(GRID)
    atomic_write(CAPTIONS, "columns: " + ", ".join(CONDITIONS) + "\n"
                 + "".join(f"{prompts['en'][c]} | {prompts['ru'][c]}\n" for c in shown))
    atomic_write(METRICS, json.dumps(metrics, indent=1, ensure_ascii=False))
    print(json.dumps(metrics, indent=1, ensure_ascii=False))
    return metrics


if __name__ == "__main__":
    main(lambda: run(load_params()))
