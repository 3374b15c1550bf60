"""Paired image synthesis for InstructPix2Pix: Prompt-to-Prompt samples of (input caption,
output caption) from shared noise, filtered by CLIP as they are made.

Unlike the original generator, which draws all `n_samples` candidates of a caption pair and
filters afterwards, sampling stops for a pair as soon as `max_out_samples` candidates pass: each
round asks every unfinished pair for as many candidates as it still needs, and all of them, from
unrelated pairs, with their own p and guidance scale, run as one batch. Candidate j of edit e
takes its noise seed, p ~ U(self_replace) and CFG ~ U(guidance) from (seed, e, j) alone.

Work is split into shards of consecutive edits (sorted by id); shard k belongs to partition
k mod n_partitions, so workers share a run without coordination. A shard is written whole
(images as .npy, the kept pairs and every try as JSONL) under a fingerprint of everything it
depends on, so a killed run resumes at the first missing shard and reruns give the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from manip.editing.benchmark import module_digest
from manip.editing.edit import edit_generated_batch
from manip.editing.p2p import P2PConfig
from manip.metrics.clip_scores import ClipScorer
from manip.training.checkpoint import atomic_write, replace_dir, staging_dir

from .clip_filter import ClipThresholds, score_pairs
from .records import CaptionEdit, item_rng


@dataclass(frozen=True)
class PairSettings:
    steps: int = 50
    n_samples: int = 100  # tries per edit at most
    max_out_samples: int = 4  # stop once this many pass the filter
    self_replace: tuple[float, float] = (0.1, 0.9)  # p ~ U(lo, hi): fraction of steps sharing self-attention
    guidance: tuple[float, float] = (7.5, 15.0)  # CFG ~ U(lo, hi)
    # Fraction of steps with injected cross-attention; None: the same p as self-attention.
    cross_replace: float | None = None
    batch_size: int = 16  # candidate pairs per UNet call
    thresholds: ClipThresholds = field(default_factory=ClipThresholds)

    def __post_init__(self) -> None:
        for name in ("self_replace", "guidance"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} range must be (low, high), got {(lo, hi)}")
        if self.max_out_samples > self.n_samples:
            raise ValueError(f"max_out_samples ({self.max_out_samples}) cannot exceed n_samples ({self.n_samples})")


@dataclass(frozen=True)
class Candidate:
    edit: CaptionEdit
    sample: int
    seed: int
    p: float
    cfg: float

    @classmethod
    def draw(cls, seed: int, edit: CaptionEdit, sample: int, s: PairSettings) -> "Candidate":
        rng = item_rng(seed, "pair", edit.id, sample)
        noise_seed = int(rng.integers(1 << 62))
        p = float(rng.uniform(*s.self_replace))
        cfg = float(rng.uniform(*s.guidance))
        return cls(edit, sample, noise_seed, round(p, 6), round(cfg, 6))

    def config(self, s: PairSettings) -> P2PConfig:
        # Captions with the same number of words swap words in place; otherwise words were added or removed.
        same = len(self.edit.input.split()) == len(self.edit.output.split())
        cross = self.p if s.cross_replace is None else s.cross_replace
        return P2PConfig(edit="replace" if same else "refine", cross_replace=cross, self_replace=self.p)


@dataclass
class ShardResult:
    pairs: np.ndarray  # (K, 2, H, W, 3) uint8, the kept pairs
    kept: list[dict]  # one row per kept pair, in the order of `pairs`
    tries: list[dict]  # one row per candidate drawn, kept or not
    seconds: float = 0.0
    unet_images: int = 0  # images denoised (2 per candidate), the cost the benchmark compares


def _run_batch(pipe: StableDiffusionPipeline, scorer: ClipScorer, batch: Sequence[Candidate],
               s: PairSettings) -> tuple[np.ndarray, list[dict]]:
    groups = [[c.edit.input, c.edit.output] for c in batch]
    gens = [torch.Generator().manual_seed(c.seed) for c in batch]
    images = edit_generated_batch(pipe, groups, gens, [c.config(s) for c in batch], s.steps, [c.cfg for c in batch])
    scores = score_pairs(scorer, images[:, 0], images[:, 1], [c.edit.input for c in batch],
                         [c.edit.output for c in batch])
    return images, scores


def synthesize(pipe: StableDiffusionPipeline, scorer: ClipScorer, edits: Sequence[CaptionEdit], seed: int,
               s: PairSettings, early_stop: bool = True, progress: bool = False) -> ShardResult:
    """Sample and filter pairs for `edits`. `early_stop=False` is the original algorithm (all
    `n_samples` tries, then keep the best `max_out_samples` by directional similarity)."""
    start = time.perf_counter()
    next_sample = {e.id: 0 for e in edits}
    passed: dict[str, list[tuple[dict, np.ndarray]]] = {e.id: [] for e in edits}
    tries: list[dict] = []
    unet_images = 0

    def wanted(e: CaptionEdit) -> int:
        left = s.n_samples - next_sample[e.id]
        need = s.max_out_samples - len(passed[e.id]) if early_stop else left
        return max(0, min(need, left))

    bar = tqdm(total=len(edits), desc="pairs", unit="edit", disable=not progress, leave=False)
    while True:
        batch: list[Candidate] = []
        for e in edits:
            for _ in range(min(wanted(e), s.batch_size - len(batch))):
                batch.append(Candidate.draw(seed, e, next_sample[e.id], s))
                next_sample[e.id] += 1
        if not batch:
            break
        images, scores = _run_batch(pipe, scorer, batch, s)
        unet_images += 2 * len(batch)
        for c, img, sc in zip(batch, images, scores):
            reasons = s.thresholds.reasons(sc)
            tries.append({"id": c.edit.id, "sample": c.sample, "seed": c.seed, "p": c.p, "cfg": c.cfg, **sc,
                          "passed": not reasons, "reasons": reasons})
            if not reasons:
                passed[c.edit.id].append((tries[-1], img))
        bar.n = sum(wanted(e) == 0 for e in edits)
        bar.refresh()
    bar.close()

    kept_rows, kept_images = [], []
    for e in edits:
        best = sorted(passed[e.id], key=lambda r: (-r[0]["clip_direction"], r[0]["sample"]))[: s.max_out_samples]
        for row, img in best:
            kept_rows.append({k: v for k, v in row.items() if k not in ("passed", "reasons")})
            kept_images.append(img)
    size = pipe.vae.config.sample_size
    pairs = np.stack(kept_images) if kept_images else np.zeros((0, 2, size, size, 3), np.uint8)
    return ShardResult(pairs, kept_rows, tries, time.perf_counter() - start, unet_images)


# ---------------------------------------------------------------- shards on disk


def shard_plan(edits: Sequence[CaptionEdit], shard_size: int) -> list[list[CaptionEdit]]:
    ordered = sorted(edits, key=lambda e: e.id)
    return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]


def models_digest(pipe: StableDiffusionPipeline, scorer: ClipScorer) -> dict[str, str]:
    return {"unet": module_digest(pipe.unet), "text_encoder": module_digest(pipe.text_encoder),
            "vae": module_digest(pipe.vae), "clip": module_digest(scorer.model)}


def shard_fingerprint(edits: Sequence[CaptionEdit], seed: int, s: PairSettings, models: dict[str, str],
                      code: str = "") -> str:
    blob = json.dumps({"edits": [asdict(e) for e in edits], "seed": seed, "settings": asdict(s), "models": models,
                       "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def write_shard(path: Path, result: ShardResult, fingerprint: str) -> None:
    tmp = staging_dir(path)
    np.save(tmp / "pairs.npy", result.pairs)
    (tmp / "kept.jsonl").write_text(_jsonl(result.kept))
    (tmp / "tries.jsonl").write_text(_jsonl(result.tries))
    # Written last: a shard folder without it is incomplete.
    atomic_write(tmp / "shard.json", json.dumps({"fingerprint": fingerprint, "kept": len(result.kept),
                                                  "tries": len(result.tries)}, sort_keys=True))
    replace_dir(tmp, path)


def shard_done(path: Path, fingerprint: str) -> bool:
    try:
        return json.loads((path / "shard.json").read_text())["fingerprint"] == fingerprint
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return False


def read_shard(path: Path) -> tuple[np.ndarray, list[dict], list[dict]]:
    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (path / name).read_text().splitlines() if line]

    return np.load(path / "pairs.npy"), rows("kept.jsonl"), rows("tries.jsonl")


@dataclass
class RunSummary:
    computed: int
    reused: int
    shards: list[Path]


def run_shards(pipe: StableDiffusionPipeline, scorer: ClipScorer, edits: Sequence[CaptionEdit], seed: int,
               s: PairSettings, work_dir: Path, shard_size: int, n_partitions: int = 1,
               partition: int | None = None, progress: bool = True, code: str = "") -> RunSummary:
    """Compute the missing shards of this partition (all partitions when None); returns the
    shard folders of the partition in order. `code` names the code that computes shards (the
    stage passes a digest of its sources): a shard made by other code is computed again."""
    if partition is not None and not 0 <= partition < n_partitions:
        raise ValueError(f"partition must be in [0, {n_partitions}), got {partition}")
    plan = shard_plan(edits, shard_size)
    models = models_digest(pipe, scorer)
    mine = [k for k in range(len(plan)) if partition is None or k % n_partitions == partition]
    computed = reused = 0
    paths = []
    for k in tqdm(mine, desc="pair shards", unit="shard", disable=not progress):
        path = Path(work_dir) / f"shard-{k:05d}"
        paths.append(path)
        fp = shard_fingerprint(plan[k], seed, s, models, code)
        if shard_done(path, fp):
            reused += 1
            continue
        write_shard(path, synthesize(pipe, scorer, plan[k], seed, s), fp)
        computed += 1
    return RunSummary(computed, reused, paths)
