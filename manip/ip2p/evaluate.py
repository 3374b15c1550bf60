"""Scoring an InstructPix2Pix model on held-out EmojiWorld edits with exact ground truth.

Each case is a rendered scene, an instruction and the render of the edited scene. The model
edits the render at several image-guidance scales; per scale we report edit success (the
attribute judge finds the edited attribute as the target scene has it), PSNR to the ground
truth, directional CLIP similarity (image change vs caption change) and CLIP image similarity
to the input: the last two traced over the scales are the paper's trade-off curve.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from manip.editing.scoring import JUDGE_HITS
from manip.metrics.clip_scores import ClipScorer
from manip.metrics.image_quality import psnr
from manip.metrics.judge import AttributeJudge, attribute_hits, predict
from manip.world import Renderer, Scene

from .clip_filter import score_pairs
from .records import CaptionEdit, item_rng


@dataclass(frozen=True)
class EvalSettings:
    steps: int = 100  # the paper's; the stages run 50 on CPUs (params.yaml)
    guidance_scale: float = 7.5
    image_guidance_scales: tuple[float, ...] = (1.0, 1.2, 1.5, 1.8, 2.2)
    batch_size: int = 16


@dataclass
class EvalCase:
    edit: CaptionEdit
    source: np.ndarray  # the render to edit
    truth: np.ndarray  # the render of the edited scene

    @property
    def target(self) -> Scene:
        return Scene.from_dict(self.edit.truth["target"])


def build_cases(edits: Sequence[CaptionEdit], renderer: Renderer) -> list[EvalCase]:
    if any(e.truth is None for e in edits):
        raise ValueError("evaluation needs edits with ground truth (the rules backend on EmojiWorld captions)")
    return [EvalCase(e, renderer.render_array(Scene.from_dict(e.truth["source"])),
                     renderer.render_array(Scene.from_dict(e.truth["target"]))) for e in edits]


@torch.inference_mode()
def run_edits(pipe, cases: Sequence[EvalCase], seed: int, s: EvalSettings, image_scale: float,
              progress: bool = False) -> np.ndarray:
    """(N, H, W, 3) uint8 edits; each case's noise comes from (seed, case id), the same at every scale."""
    out = []
    for i in tqdm(range(0, len(cases), s.batch_size), desc=f"ip2p edits @ {image_scale}", disable=not progress):
        batch = cases[i : i + s.batch_size]
        gens = [torch.Generator().manual_seed(int(item_rng(seed, "ip2p-eval", c.edit.id).integers(1 << 62)))
                for c in batch]
        images = pipe(prompt=[c.edit.edit for c in batch], image=[Image.fromarray(c.source) for c in batch],
                      num_inference_steps=s.steps, guidance_scale=s.guidance_scale, image_guidance_scale=image_scale,
                      generator=gens, output_type="np").images
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out)


def score(cases: Sequence[EvalCase], edited: np.ndarray, scorer: ClipScorer, judge: AttributeJudge) -> list[dict]:
    sources = np.stack([c.source for c in cases])
    clip = score_pairs(scorer, sources, edited, [c.edit.input for c in cases], [c.edit.output for c in cases])
    hits = attribute_hits(predict(judge, edited), [c.target for c in cases])
    rows = []
    for i, c in enumerate(cases):
        ok = all(bool(hits[k][i]) for k in JUDGE_HITS[c.edit.kind])
        rows.append({"id": c.edit.id, "kind": c.edit.kind, "success": float(ok),
                     "gt_psnr": float(psnr(edited[i], c.truth)), "clip_direction": clip[i]["clip_direction"],
                     "clip_image": clip[i]["clip_image"], "clip_text_output": clip[i]["clip_text_output"]})
    return rows


def summarise(rows: Sequence[dict]) -> dict[str, float]:
    keys = ("success", "gt_psnr", "clip_direction", "clip_image", "clip_text_output")
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys}


def by_kind(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """`summarise` per edit kind."""
    return {k: summarise([r for r in rows if r["kind"] == k]) for k in sorted({r["kind"] for r in rows})}


def save_grid(path: Path, cases: Sequence[EvalCase], edits: dict[object, np.ndarray]) -> None:
    """`grid`, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    grid(cases, edits).save(tmp)
    tmp.replace(path)


def grid_rows(cases: Sequence[EvalCase], per_kind: int = 1) -> list[int]:
    """The cases a grid shows: the first `per_kind` of each edit kind, in case order."""
    rows, seen = [], {}
    for i, c in enumerate(cases):
        if seen.get(c.edit.kind, 0) < per_kind:
            seen[c.edit.kind] = seen.get(c.edit.kind, 0) + 1
            rows.append(i)
    return rows


def grid(cases: Sequence[EvalCase], edits: dict[object, np.ndarray], per_kind: int = 1, scale: int = 3) -> Image.Image:
    """Rows of input | ground truth | each of `edits` in its order (image-guidance scales, models),
    for the cases of `grid_rows`."""
    rows = [np.concatenate([cases[i].source, cases[i].truth, *(edits[k][i] for k in edits)], 1)
            for i in grid_rows(cases, per_kind)]
    image = Image.fromarray(np.concatenate(rows, 0))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)
