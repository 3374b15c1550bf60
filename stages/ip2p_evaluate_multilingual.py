"""Stage `ip2p_evaluate_multilingual`: does a Russian instruction edit as its English twin does?

The held-out cases of `ip2p_evaluate` (test-split scenes, balanced rules edits, exact ground
truth), each written in both languages with one ground truth (manip/ip2p/bilingual.py), edited
at the default image-guidance scale under three conditions with the same noise per case:
`models/ip2p` on the English instruction, `models/ip2p_multilingual` on the English one and on
the Russian one. Scored as `ip2p_evaluate` scores (edit success by the judge, PSNR to the ground
truth, directional and image CLIP, always against the English captions: the evaluator CLIP reads
English only). Reported: each condition overall and per edit kind, and Russian minus English
(success and CLIP in points, PSNR in dB) against both English references.

Outputs metrics/ip2p_multilingual_eval.json, plots/ip2p_multilingual_grid.png (input | ground
truth | one column per condition) and, beside it, each row's instruction in both languages.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from manip.runtime import device, set_threads
from manip.training.checkpoint import atomic_write

from ._runner import main
from .common import require
from .ip2p_common import CLIP, IP2P, IP2P_MULTILINGUAL, write_metrics
from .params import Params, load_params

JUDGE, TEST = Path("models/judge"), Path("data/world/test")
METRICS = Path("metrics/ip2p_multilingual_eval.json")
GRID = Path("plots/ip2p_multilingual_grid.png")
CAPTIONS = Path("plots/ip2p_multilingual_grid_captions.txt")
# condition -> (model, instruction language)
CONDITIONS = {"ip2p_en": (IP2P, "en"), "ip2p_multilingual_en": (IP2P_MULTILINGUAL, "en"),
              "ip2p_multilingual_ru": (IP2P_MULTILINGUAL, "ru")}
TOLERANCE_POINTS = 5.0


def differences(scores: dict[str, dict[str, float]], reference: str) -> dict:
    """Russian minus English: success and the CLIP similarities in points, PSNR in dB."""
    ru, en = scores["ip2p_multilingual_ru"], scores[reference]
    diff = {k: round((1 if k == "gt_psnr" else 100) * (ru[k] - en[k]), 2) for k in en}
    return {"ru_minus_en": diff, "success_within_5_points": abs(diff["success"]) <= TOLERANCE_POINTS}


def run(params: Params, progress: bool = True) -> dict:
    set_threads()
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from manip.ip2p.bilingual import parallel_edits
    from manip.ip2p.evaluate import (EvalSettings, build_cases, by_kind, grid_rows, run_edits, save_grid, score,
                                     summarise)
    from manip.metrics.clip_scores import ClipScorer
    from manip.metrics.judge import AttributeJudge
    from manip.world import Artwork, Renderer
    from manip.world.dataset import load_split

    e = params.ip2p.evaluate
    english, russian = parallel_edits(load_split(require(TEST, "world")).scenes, params.seed, e.n_cases, "test",
                                      balanced=True)
    cases = build_cases(english, Renderer(Artwork(params.world.artwork_dir), params.world.size))
    in_language = {"en": cases, "ru": [dataclasses.replace(c, edit=r) for c, r in zip(cases, russian)]}
    scorer = ClipScorer(require(CLIP / "config.json", "evaluator").parent, device=device())
    judge = AttributeJudge.from_pretrained(require(JUDGE / "config.json", "evaluator").parent).eval().to(device())
    s = EvalSettings(e.steps, e.guidance_scale, (e.default_image_guidance,), e.batch_size)

    pipes = {}
    for model, stage in ((IP2P, "ip2p_finetune"), (IP2P_MULTILINGUAL, "ip2p_multilingual")):
        pipes[model] = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            require(model / "model_index.json", stage).parent, safety_checker=None, requires_safety_checker=False)
        pipes[model].set_progress_bar_config(disable=True)
        pipes[model].to(device())
    outputs, rows = {}, {}
    for name, (model, language) in CONDITIONS.items():
        outputs[name] = run_edits(pipes[model], in_language[language], params.seed, s, e.default_image_guidance,
                                  progress)
        rows[name] = score(cases, outputs[name], scorer, judge)
    scores = {name: summarise(r) for name, r in rows.items()}
    save_grid(GRID, cases, outputs)
    atomic_write(CAPTIONS, "columns: input, ground truth, " + ", ".join(CONDITIONS) + "\n"
                 + "".join(f"{cases[i].edit.kind}: {cases[i].edit.edit} | {russian[i].edit}\n" for i in grid_rows(cases)))
    return write_metrics(METRICS, {
        "n_cases": len(cases), "steps": e.steps, "guidance_scale": e.guidance_scale,
        "image_guidance_scale": e.default_image_guidance,
        "scores": scores,
        "per_kind": {name: by_kind(r) for name, r in rows.items()},
        "vs_ip2p_en": differences(scores, "ip2p_en"),
        "vs_ip2p_multilingual_en": differences(scores, "ip2p_multilingual_en"),
        "grid_columns": ["input", "ground truth", *CONDITIONS],
    })


if __name__ == "__main__":
    main(lambda: run(load_params()))
