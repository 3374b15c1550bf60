"""Stage `edit_benchmark`: EmojiWorld-Edit, every inversion method x Prompt-to-Prompt on one set
of real-image edits with exact ground truth (see manip/editing/benchmark.py).

Inputs: models/base (the pipeline that edits), models/clip (CLIP-T and structure distance),
models/judge (edit success), data/world/test (the source scenes) and the emoji artwork (the
ground-truth renders). Outputs: metrics/edit_benchmark.json (means per inversion x edit type and
per inversion overall), plots/edit_benchmark_cases.csv (one row per method x case) and
plots/edit_grid.png (input | ground truth | each method, a few cases per edit type).

Work is kept per (method, case) under data/edit_benchmark/ and resumed; `limit_per_run` caps
how many shards one invocation computes (the reports then cover what is finished and say
`"complete": false`).
"""
from __future__ import annotations

import json
from pathlib import Path

from manip.editing.benchmark import (KINDS, BenchmarkSettings, EditBenchmark, aggregate, build_cases, cases_csv,
                                     edit_grid)
from manip.runtime import device, set_threads
from manip.training.checkpoint import atomic_write

from ._runner import main
from .common import code_digest, require
from .params import EditBenchmarkParams, Params, load_params

BASE, CLIP, JUDGE = Path("models/base"), Path("models/clip"), Path("models/judge")
TEST = Path("data/world/test")
WORK = Path("data/edit_benchmark")
METRICS = Path("metrics/edit_benchmark.json")
CASES_CSV = Path("plots/edit_benchmark_cases.csv")
GRID = Path("plots/edit_grid.png")
# What a shard's images come from (dvc.yaml's deps less the scoring code, which reruns the stage
# but only rescores): shards made by other code are redone.
CODE = ("manip/editing/attention.py", "manip/editing/benchmark.py", "manip/editing/edit.py",
        "manip/editing/images.py", "manip/editing/inversion.py", "manip/editing/p2p.py", "manip/editing/tokens.py",
        "manip/sampling.py", "manip/prompts.py", "manip/multilingual/language.py", "manip/multilingual/russian.py",
        "manip/world")


def settings(bench: EditBenchmarkParams) -> BenchmarkSettings:
    return BenchmarkSettings(**bench.model_dump(exclude={"n_cases", "inversions", "limit_per_run"}))


def run(params: Params, progress: bool = True) -> dict:
    bench = params.edit_benchmark
    set_threads()
    # Heavy imports here, so that a params error is reported before torch loads.
    from diffusers import StableDiffusionPipeline

    from manip.metrics.clip_scores import ClipScorer
    from manip.metrics.judge import AttributeJudge
    from manip.world import Artwork, Renderer
    from manip.world.dataset import load_split

    require(BASE / "model_index.json", "unet")
    require(CLIP / "config.json", "evaluator")
    require(JUDGE / "config.json", "evaluator")
    require(TEST / "images.npy", "world")
    pipe = StableDiffusionPipeline.from_pretrained(BASE, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device())
    scorer = ClipScorer(CLIP, device=device())
    judge = AttributeJudge.from_pretrained(JUDGE).eval().to(device())
    renderer = Renderer(Artwork(params.world.artwork_dir), params.world.size)
    test = load_split(TEST)

    cases = build_cases(test.scenes, params.seed, bench.n_cases)
    methods = list(bench.inversions)
    runner = EditBenchmark(pipe, renderer, scorer, judge, settings(bench), WORK, code=code_digest(*CODE))
    summary = runner.run(cases, methods, limit=bench.limit_per_run, progress=progress)
    records = runner.records(cases, methods)

    metrics = {
        "complete": summary.complete, "n_cases": len(cases),
        "n_cases_by_kind": {k: sum(c.kind == k for c in cases) for k in KINDS},
        "shards": {"done": len(records), "remaining": summary.remaining},
        "settings": bench.model_dump(exclude={"limit_per_run", "n_cases"}),
        "grid_columns": ["input", "ground truth", *methods],
        "inversions": aggregate(records, methods),
    }
    atomic_write(CASES_CSV, cases_csv(records))
    grid = edit_grid(runner, cases, methods)
    if grid is not None:
        GRID.parent.mkdir(parents=True, exist_ok=True)
        tmp = GRID.with_suffix(".tmp.png")
        grid.save(tmp)
        tmp.replace(GRID)
    atomic_write(METRICS, json.dumps(metrics, indent=1))
    print(json.dumps({m: v["overall"] for m, v in metrics["inversions"].items()}, indent=1))
    print(f"{summary.computed} (method, case) shards computed in this run, {summary.reused} reused")
    if not summary.complete:
        print(f"{summary.remaining} (method, case) shards left: run the stage again to continue")
    return metrics


if __name__ == "__main__":
    main(lambda: run(load_params()))
