"""Stage `evaluator`: the judges every later stage scores with.

- models/clip: a CLIPModel (+ processor config) trained on all objects, reserved concepts
  included, for CLIP filtering and CLIP-T / CLIP-I / directional metrics.
- models/judge: the attribute classifier, trained on real renders.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPImageProcessor, CLIPTokenizer

from manip.metrics.judge import AttributeJudge, attribute_hits, predict
from manip.training.judge import train_judge
from manip.world.dataset import load_split

from ._runner import main
from .clip_common import fit_clip
from .common import fingerprint, loop_config, publish, require, save_pretrained
from .params import Params, load_params

CLIP_OUT = Path("models/clip")
JUDGE_OUT = Path("models/judge")
METRICS = Path("metrics/evaluator.json")
PLOTS = {"clip": Path("plots/evaluator_clip_loss.csv"), "judge": Path("plots/judge_loss.csv")}
TOKENIZER = Path("models/base/tokenizer")


def image_processor(size: int) -> CLIPImageProcessor:
    """Pixels scaled to [-1, 1] at the world's resolution, as the model was trained."""
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )


def run(params: Params) -> dict:
    tokenizer = CLIPTokenizer.from_pretrained(require(TOKENIZER, "text_encoder"))
    clip, clip_history, metrics = fit_clip(params, params.evaluator, tokenizer, ["train", "concepts"],
                                           params.seed + 1, "evaluator")
    save_pretrained(CLIP_OUT, clip, tokenizer, image_processor(params.world.size))

    torch.manual_seed(params.seed + 2)
    train_split, concepts = load_split("data/world/train"), load_split("data/world/concepts")
    images = np.concatenate([np.asarray(train_split.images), np.asarray(concepts.images)])
    judge = AttributeJudge(width=params.judge.width, image_size=params.world.size)
    result = train_judge(judge, images, train_split.scenes + concepts.scenes, loop_config(params.judge.train),
                         params.judge.train.batch_size, params.seed + 2, Path("checkpoints/judge"),
                         fingerprint(params.judge, params.seed + 2))
    test = load_split("data/world/test")
    hits = attribute_hits(predict(result.model, np.asarray(test.images)), test.scenes)
    metrics.update({f"judge_test_{k}": round(float(v.mean()), 4) for k, v in hits.items()})
    metrics["judge_train_seconds"] = result.seconds
    save_pretrained(JUDGE_OUT, result.model)
    return publish(metrics, METRICS, {PLOTS["clip"]: clip_history, PLOTS["judge"]: result.history})


if __name__ == "__main__":
    main(lambda: run(load_params()))
