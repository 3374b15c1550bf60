"""Stage `ip2p_pairs`: Prompt-to-Prompt image pairs for every caption edit, CLIP-filtered as they
are sampled (see manip/ip2p/pairs.py), in shards under data/ip2p/pairs/.

`python -m stages.ip2p_pairs --partition K --n-partitions N` computes only the shards of one
partition (what a worker runs); without them every shard is computed or reused and
metrics/ip2p_pairs.json reports the filter: tries, pass rate, rejections per reason.
"""
from __future__ import annotations

import argparse
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from manip.ip2p.clip_filter import PROFILES
from manip.ip2p.dataset import filter_report
from manip.ip2p.pairs import PairSettings
from manip.runtime import device, set_threads

from ._runner import main
from .common import code_digest, require
from .ip2p_common import BASE, CLIP, EDITS, PAIRS, write_metrics
from .params import Params, PairsParams, load_params

METRICS = Path("metrics/ip2p_pairs.json")
# What a shard's content comes from, as in dvc.yaml's deps: shards made by other code are redone.
CODE = ("manip/ip2p/pairs.py", "manip/ip2p/clip_filter.py", "manip/ip2p/records.py", "manip/editing/attention.py",
        "manip/editing/benchmark.py", "manip/editing/edit.py", "manip/editing/inversion.py", "manip/editing/p2p.py",
        "manip/editing/tokens.py", "manip/sampling.py", "manip/prompts.py", "manip/metrics/clip_scores.py",
        "manip/multilingual/language.py", "manip/multilingual/russian.py")


def pair_settings(p: PairsParams) -> PairSettings:
    overrides = {k: v for k, v in p.filter.model_dump(exclude={"profile"}).items() if v is not None}
    thresholds = replace(PROFILES[p.filter.profile], **overrides)
    return PairSettings(steps=p.steps, n_samples=p.n_samples, max_out_samples=p.max_out_samples,
                        self_replace=tuple(p.self_replace), guidance=tuple(p.guidance), cross_replace=p.cross_replace,
                        batch_size=p.batch_size, thresholds=thresholds)


def run(params: Params, partition: int | None = None, n_partitions: int | None = None, progress: bool = True) -> dict:
    set_threads()
    from diffusers import StableDiffusionPipeline

    from manip.ip2p import CaptionEdit, read_jsonl
    from manip.ip2p.pairs import read_shard, run_shards
    from manip.metrics.clip_scores import ClipScorer

    p = params.ip2p.pairs
    edits = read_jsonl(require(EDITS, "ip2p_edits"), CaptionEdit)
    pipe = StableDiffusionPipeline.from_pretrained(require(BASE / "model_index.json", "unet").parent,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device())
    scorer = ClipScorer(require(CLIP / "config.json", "evaluator").parent, device=device())
    n_partitions = n_partitions or p.n_partitions
    settings = pair_settings(p)
    summary = run_shards(pipe, scorer, edits, params.seed, settings, PAIRS, p.shard_size, n_partitions,
                         partition, progress, code=code_digest(*CODE))
    print(f"{summary.computed} shards computed in this run, {summary.reused} reused")
    if partition is not None:
        return {"partition": partition, "computed": summary.computed, "reused": summary.reused}
    planned = {path.name for path in summary.shards}
    for stale in PAIRS.glob("shard-*"):  # shards of an earlier, longer edit list
        if stale.name not in planned:
            shutil.rmtree(stale)
    shards = [read_shard(path) for path in summary.shards]
    tries = [t for _, _, shard_tries in shards for t in shard_tries]
    kept = [k for _, shard_kept, _ in shards for k in shard_kept]
    report = filter_report(tries, len(edits), kept)
    return write_metrics(METRICS, {**report, "thresholds": asdict(settings.thresholds),
                                   "profile": p.filter.profile, "shards": len(summary.shards),
                                   "unet_images": 2 * len(tries)})


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partition", type=int, default=None)
    ap.add_argument("--n-partitions", type=int, default=None)
    args = ap.parse_args()
    if (args.partition is None) != (args.n_partitions is None):
        ap.error("--partition and --n-partitions go together")
    if args.partition is not None and not 0 <= args.partition < args.n_partitions:
        ap.error(f"--partition must be in [0, {args.n_partitions}) with --n-partitions {args.n_partitions}, "
                 f"got {args.partition}")
    run(load_params(), args.partition, args.n_partitions)


if __name__ == "__main__":
    main(cli)
