"""Stage `ip2p_evaluate`: the fine-tuned InstructPix2Pix model on held-out EmojiWorld edits (test
split scenes, rules-backend instructions, exact ground-truth renders), at every image-guidance
scale: edit success, PSNR to the ground truth, directional CLIP and CLIP image similarity.

Outputs metrics/ip2p_eval.json (per scale, per edit kind at the default scale, and the
do-nothing baseline that returns the input unchanged), plots/ip2p_tradeoff.csv (the paper's
CLIP image similarity vs directional similarity curve over image-guidance scales) and
plots/ip2p_eval_grid.png (input | ground truth | each scale).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from manip.ip2p import RulesEditor, world_captions
from manip.runtime import device, set_threads
from manip.training.checkpoint import atomic_write

from ._runner import main
from .common import require
from .ip2p_common import CLIP, IP2P, write_metrics
from .params import Params, load_params

JUDGE, TEST = Path("models/judge"), Path("data/world/test")
METRICS = Path("metrics/ip2p_eval.json")
CURVE = Path("plots/ip2p_tradeoff.csv")
GRID = Path("plots/ip2p_eval_grid.png")


def run(params: Params, progress: bool = True) -> dict:
    set_threads()
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from manip.ip2p.evaluate import EvalSettings, build_cases, by_kind, run_edits, save_grid, score, summarise
    from manip.metrics.clip_scores import ClipScorer
    from manip.metrics.judge import AttributeJudge
    from manip.world import Artwork, Renderer
    from manip.world.dataset import load_split

    e = params.ip2p.evaluate
    model = require(IP2P / "model_index.json", "ip2p_finetune").parent
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(model, safety_checker=None,
                                                                  requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device())
    scorer = ClipScorer(require(CLIP / "config.json", "evaluator").parent, device=device())
    judge = AttributeJudge.from_pretrained(require(JUDGE / "config.json", "evaluator").parent).eval().to(device())
    renderer = Renderer(Artwork(params.world.artwork_dir), params.world.size)
    captions = world_captions(load_split(require(TEST, "world")).scenes, params.seed, e.n_cases, prefix="test")
    edits, _ = RulesEditor(params.seed).edit_all(captions, balanced=True)
    cases = build_cases(edits, renderer)
    s = EvalSettings(e.steps, e.guidance_scale, tuple(e.image_guidance_scales), e.batch_size)

    outputs, per_scale, rows_at = {}, {}, {}
    for scale in s.image_guidance_scales:
        outputs[scale] = run_edits(pipe, cases, params.seed, s, scale, progress)
        rows_at[scale] = score(cases, outputs[scale], scorer, judge)
        per_scale[str(scale)] = summarise(rows_at[scale])
    identity = summarise(score(cases, np.stack([c.source for c in cases]), scorer, judge))
    default = rows_at[e.default_image_guidance]

    buf = io.StringIO()
    buf.write("image_guidance_scale,clip_direction,clip_image,success,gt_psnr\n")
    for scale in s.image_guidance_scales:
        m = per_scale[str(scale)]
        buf.write(f"{scale},{m['clip_direction']},{m['clip_image']},{m['success']},{m['gt_psnr']}\n")
    atomic_write(CURVE, buf.getvalue())
    save_grid(GRID, cases, outputs)
    return write_metrics(METRICS, {
        "n_cases": len(cases), "steps": e.steps, "guidance_scale": e.guidance_scale,
        "default_image_guidance": e.default_image_guidance, "per_image_guidance": per_scale,
        "per_kind_at_default": by_kind(default), "unchanged_input_baseline": identity,
        "grid_columns": ["input", "ground truth", *[f"image guidance {x}" for x in s.image_guidance_scales]],
    })


if __name__ == "__main__":
    main(lambda: run(load_params()))
