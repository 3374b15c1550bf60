"""Stage `ip2p_dataset`: publish the filtered pairs as a Hugging Face dataset (Parquet with Image
features, the columns `train_instruct_pix2pix.py` reads, provenance per row) with a dataset card,
under data/ip2p/dataset/, plus metrics/ip2p_dataset.json and plots/ip2p_pairs.png (a few pairs).

Load it with `datasets.load_dataset("data/ip2p/dataset", split="train")`, or train the diffusers
example on it with `--dataset_name data/ip2p/dataset`.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from manip.ip2p import CaptionEdit, read_jsonl
from manip.ip2p.dataset import dataset_card, filter_report, rows_from_shards, write_dataset
from manip.ip2p.pairs import read_shard, shard_plan

from ._runner import StageInputError, main
from .common import require
from .ip2p_common import DATASET, EDITS, PAIRS, write_metrics
from .params import Params, load_params

METRICS = Path("metrics/ip2p_dataset.json")
PREVIEW = Path("plots/ip2p_pairs.png")


def preview(shards: list[tuple[np.ndarray, list[dict], list[dict]]], n: int = 8) -> Image.Image:
    """Input above edited image for the first kept pair of the first `n` shards that have one."""
    firsts = [pairs[0] for pairs, _, _ in shards if len(pairs)][:n]
    return Image.fromarray(np.concatenate([np.concatenate(list(p), 0) for p in firsts], 1))


def run(params: Params) -> dict:
    edits = read_jsonl(require(EDITS, "ip2p_edits"), CaptionEdit)
    plan = shard_plan(edits, params.ip2p.pairs.shard_size)
    paths = [PAIRS / f"shard-{k:05d}" for k in range(len(plan))]
    missing = [p.name for p in paths if not (p / "shard.json").is_file()]
    if missing:
        raise StageInputError(f"{len(missing)} pair shards are missing (first: {missing[0]}): "
                              "run `dvc repro ip2p_pairs` (or the workers' partitions) first")
    shards = [read_shard(p) for p in paths]
    rows = rows_from_shards(((pairs, kept) for pairs, kept, _ in shards), {e.id: e for e in edits},
                            params.ip2p.dataset.max_per_edit)
    report = filter_report([t for _, _, tries in shards for t in tries], len(edits), rows)
    if not rows:
        raise StageInputError(f"no pair passed the CLIP filter in {report['tries']} tries "
                              f"(rejections: {report['rejections']}): loosen ip2p.pairs.filter or check the base model")
    provenance = {"seed": params.seed, "captions": params.ip2p.captions.model_dump(),
                  "edits_backend": params.ip2p.edits.backend, "pairs": params.ip2p.pairs.model_dump(),
                  "dataset": params.ip2p.dataset.model_dump()}
    write_dataset(DATASET, rows, dataset_card(report, rows, provenance), params.ip2p.dataset.rows_per_file)
    PREVIEW.parent.mkdir(parents=True, exist_ok=True)
    tmp = PREVIEW.with_suffix(".tmp.png")
    preview(shards).save(tmp)
    tmp.replace(PREVIEW)
    by_kind = dict(sorted(Counter(r["kind"] or "unlabelled" for r in rows).items()))
    return write_metrics(METRICS, {**report, "pairs_by_kind": by_kind})


if __name__ == "__main__":
    main(lambda: run(load_params()))
