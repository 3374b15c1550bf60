"""Every editing method on the same EmojiWorld-Edit cases, scored like the inversion benchmark.

A *run* is a labelled (method, settings) pair. Each (run, case) is one shard under the work
directory (a PNG of reconstruction and edit + JSON with seconds, memory and sizes, written
atomically, keyed by a fingerprint of everything that produced the images), so a killed run
resumes and a changed setting recomputes only what it affects; scores are computed from the
stored images when shards are read. A case's parts (fine-tuned weights, inversions) are cached
under the work directory while the case is in progress, so an interrupted fine-tune resumes
from its checkpoint, and are removed once its shard is written: the benchmark measures what a
method stores per image without keeping 4 MB of weights per case on disk.

The first `reuse_cases` cases are edited a second time toward another target with the parts
still cached: the time of that second edit is what a user re-editing an image pays.
"""
from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from manip.multilingual.corpus import CAPTION_WRITERS
from manip.multilingual.language import Language
from manip.runtime import PeakMemory
from manip.training.checkpoint import atomic_write
from manip.world.edits import Edit, render_edit

from ..benchmark import KINDS, METRICS, EditCase, _clean, _resize, fingerprint, read_shard, scored, shard_paths
from ..inversion import model_id
from ..scoring import EditScorer
from . import EDITORS, make_config
from .base import EditRequest, PartCache

if TYPE_CHECKING:
    from manip.ip2p.sentences import SentenceSets

RUN_METRICS: tuple[str, ...] = (*(m for m in METRICS if m != "invert_seconds"), "prepare_seconds", "peak_memory_mb",
                                 "stored_bytes")


@dataclass(frozen=True)
class MethodRun:
    label: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    model: str = "base"  # which of the runner's pipelines it edits with
    language: Language = "en"  # the language of its prompts: captions, instructions, sentence sets

    def config(self):
        return make_config(self.method, self.settings)


def case_seed(seed: int, case: EditCase) -> int:
    """The same noise for every method on a case."""
    return int(np.random.default_rng([seed, 7, case.index, KINDS.index(case.kind)]).integers(2**31))


class MethodRuns:
    """`pipes` maps a run's `model` name to its pipeline; `instruction(edit, case, language)`
    phrases an edit as an instruction for the instruction-following methods;
    `sentences(edit, case, language)` gives the sentence sets of the methods that take them
    (pix2pix-zero); `second_edit(case)` is another edit of the case's scene, for the reuse
    measurement. A run's prompts are in its language; scores read the English ground truth, so
    runs in either language are measured alike."""

    def __init__(self, pipes: dict[str, Any], renderer, scorer, judge, runs: Sequence[MethodRun], work_dir: str | Path,
                 seed: int, instruction: Callable[[Edit, EditCase, Language], str],
                 second_edit: Callable[[EditCase], Edit],
                 sentences: Callable[[Edit, EditCase, Language], SentenceSets] | None, reuse_cases: int = 2):
        labels = [r.label for r in runs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"run labels must be distinct, got {labels}")
        if sentences is None and any(EDITORS[r.method].uses_sentences for r in runs):
            raise ValueError("a run reads sentence sets (pix2pix-zero) but no sentence source was given")
        missing = sorted({r.model for r in runs} - set(pipes))
        if missing:
            raise ValueError(f"runs name models {missing} that were not given; have {sorted(pipes)}")
        self.pipes, self.renderer = pipes, renderer
        self.runs = {r.label: r for r in runs}
        self.configs = {r.label: r.config() for r in runs}
        self.work_dir, self.seed = Path(work_dir), seed
        self.instruction, self.second_edit, self.reuse_cases = instruction, second_edit, reuse_cases
        self.sentences = sentences
        self.model_ids = {name: model_id(p) for name, p in pipes.items()}
        self.score = EditScorer(renderer, scorer, judge)
        self._reused: set[str] = set()
        self.size = renderer.size

    def fingerprint(self, case: EditCase, label: str) -> str:
        """Everything a shard's images depend on: the case, the method and its code version, its
        settings and model, the sentence sets it reads, the size of the renders."""
        run = self.runs[label]
        settings = {"method": run.method, "version": EDITORS[run.method].version,
                    "config": asdict(self.configs[label]), "model": run.model, "seed": self.seed,
                    "reuse": case.case_id in self._reused}
        if run.language != "en":
            settings["language"] = run.language
        if EDITORS[run.method].uses_sentences:
            settings["sentences"] = self.sentences(case.edit, case, run.language)
        return fingerprint(case, label, settings, {"model": self.model_ids[run.model], "world_size": str(self.size)})

    def request(self, label: str, case: EditCase, source: np.ndarray, edit: Edit | None = None) -> EditRequest:
        """Run `label`'s request for the case's edit, or for `edit` (another edit of the same
        scene) of the same source image."""
        edit = edit or case.edit
        run = self.runs[label]
        write = CAPTION_WRITERS[run.language][1]
        uses_sentences = EDITORS[run.method].uses_sentences
        return EditRequest(image=source, source=write(edit.source, 0), target=write(edit.target, 0),
                           instruction=self.instruction(edit, case, run.language),
                           sentences=self.sentences(edit, case, run.language) if uses_sentences else None,
                           seed=case_seed(self.seed, case))

    def _compute(self, case: EditCase, label: str) -> tuple[dict, bytes]:
        run = self.runs[label]
        pipe = self.pipes[run.model]
        parts = self.work_dir / ".parts" / label / case.case_id
        cache = PartCache(parts)
        editor = EDITORS[run.method](pipe, self.configs[label], cache)
        source = render_edit(self.renderer, case.edit)[0]
        model_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        image = _resize(source, model_size)
        with PeakMemory() as peak:
            out = editor.edit(self.request(label, case, image))
        edited = _resize(out.image, self.size)
        recon = _resize(out.reconstruction, self.size) if out.reconstruction is not None else None
        metrics = {"prepare_seconds": sum(v for k, v in out.seconds.items() if k != "edit"),
                   "edit_seconds": out.seconds["edit"], "peak_memory_mb": peak.megabytes,
                   "stored_bytes": out.stored_bytes}
        record = {"fingerprint": self.fingerprint(case, label), "method": label, "case": case.to_dict(),
                  "part_seconds": out.seconds, "reconstruction": recon is not None,
                  "metrics": {k: _clean(v) for k, v in metrics.items()}}
        if case.case_id in self._reused:
            again = editor.edit(self.request(label, case, image, self.second_edit(case)))
            record["second_edit"] = {"seconds": again.seconds, "cached": again.cached,
                                     "total_seconds": again.total_seconds, "first_total_seconds": out.total_seconds}
        shutil.rmtree(parts, ignore_errors=True)
        buf = io.BytesIO()
        left = recon if recon is not None else np.zeros_like(edited)
        Image.fromarray(np.concatenate([left, edited], 1)).save(buf, format="PNG")
        return record, buf.getvalue()

    def run(self, cases: Sequence[EditCase], labels: Sequence[str] | None = None, limit: int | None = None,
            progress: bool = True) -> tuple[int, int]:
        """Compute every missing (run, case) shard, at most `limit` in this call; (computed, remaining)."""
        labels = list(labels or self.runs)
        self._reused = {c.case_id for c in cases[: self.reuse_cases]}
        pending = [(label, c) for label in labels for c in cases
                   if read_shard(self.work_dir, label, c, self.fingerprint(c, label)) is None]
        todo = pending if limit is None else pending[:limit]
        for label, case in tqdm(todo, desc="edit runs", dynamic_ncols=True, disable=not progress):
            record, png = self._compute(case, label)
            js, png_path = shard_paths(self.work_dir, label, case.case_id)
            atomic_write(png_path, png)  # the JSON goes last: its presence means the shard is whole
            atomic_write(js, json.dumps(record, indent=1).encode())
        return len(todo), len(pending) - len(todo)

    def records(self, cases: Sequence[EditCase], labels: Sequence[str] | None = None) -> list[dict]:
        self._reused = {c.case_id for c in cases[: self.reuse_cases]}
        out = []
        for c in cases:
            for label in labels or self.runs:
                rec = read_shard(self.work_dir, label, c, self.fingerprint(c, label))
                if rec is not None:
                    out.append(scored(rec, c, self.work_dir, self.score))
        return out


def reuse_summary(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per run: mean seconds of a first edit and of a second edit of the same image, and the ratio."""
    out: dict[str, dict[str, float]] = {}
    for label in dict.fromkeys(r["method"] for r in records):
        pairs = [r["second_edit"] for r in records if r["method"] == label and "second_edit" in r]
        if pairs:
            first = float(np.mean([p["first_total_seconds"] for p in pairs]))
            second = float(np.mean([p["total_seconds"] for p in pairs]))
            out[label] = {"n": len(pairs), "first_seconds": round(first, 3), "second_seconds": round(second, 3),
                          "speedup": round(first / max(second, 1e-9), 2)}
    return out
