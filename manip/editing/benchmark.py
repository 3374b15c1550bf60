"""EmojiWorld-Edit: real-image editing scored against exact ground truth.

Each case takes a test-split scene, changes one attribute with `manip.world.apply_edit` and
renders both scenes: the source render is the "real" image to edit, the target render is the
right answer, and the pixels that differ are the region the edit may touch. Captions are the
canonical (phrasing-0) captions of the two scenes, so the Prompt-to-Prompt edit is exactly the
caption change: `replace` when both captions have the same number of words, `refine` otherwise,
with local blending on the words that differ.

For each inversion method the source image is inverted once and the inversion reused for the
edit. Every (method, case) pair is one shard (a PNG of reconstruction and edit + JSON with the
case, seconds and notes) written atomically under a work directory and keyed by a fingerprint of
everything that produced the images, so a killed run resumes where it stopped and a changed
setting recomputes only what it affects. Scores are computed from the stored images when shards
are read (`manip.editing.scoring`), so changing what is measured never recomputes an edit. No
file layout is assumed beyond that directory.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from manip.training.checkpoint import atomic_write
from manip.world.captions import caption
from manip.world.edits import Edit, EditNotApplicable, apply_edit, render_edit
from manip.world.scene import Scene

from .edit import edit_inverted_batch
from .images import load_image
from .inversion import METHODS, invert_batch, model_id
from .p2p import P2PConfig
from .scoring import EditScorer
from .tokens import bare_word

KINDS: tuple[str, ...] = ("object", "colour", "background", "time", "add", "style")
# Function words are not blended on: "a" occurs several times in most captions.
# Function words of English and Russian captions: a word swap never needs them blended.
STOPWORDS = frozenset({"a", "an", "the", "of", "and", "on", "in", "at", "with", "to",
                       "и", "на", "в", "во", "с", "со", "у", "к"})
METRICS: tuple[str, ...] = (
    "recon_psnr", "recon_ssim", "bg_psnr", "bg_mse", "bg_ssim", "gt_psnr_in", "gt_psnr_out",
    "clip_t", "clip_t_region", "structure_dist", "success", "invert_seconds", "edit_seconds", "mask_fraction",
)


# ---------------------------------------------------------------- cases


@dataclass(frozen=True)
class EditCase:
    case_id: str
    index: int  # test-split index of the source scene
    kind: str
    before: str
    after: str
    source: Scene
    target: Scene

    @property
    def source_caption(self) -> str:
        return caption(self.source, 0)

    @property
    def target_caption(self) -> str:
        return caption(self.target, 0)

    @property
    def mode(self) -> str:
        """P2P edit kind: replace needs the same number of words on both sides."""
        same = len(self.source_caption.split()) == len(self.target_caption.split())
        return "replace" if same else "refine"

    @property
    def edit(self) -> Edit:
        return Edit(self.kind, self.before, self.after, self.source, self.target)

    def to_dict(self) -> dict:
        return {"case_id": self.case_id, "index": self.index, "kind": self.kind, "before": self.before,
                "after": self.after, "source": self.source.to_dict(), "target": self.target.to_dict(),
                "source_caption": self.source_caption, "target_caption": self.target_caption, "mode": self.mode}


def build_cases(scenes: Sequence[Scene], seed: int, n_cases: int, kinds: Sequence[str] = KINDS) -> list[EditCase]:
    """`n_cases` cases, kinds taken in turn. For each kind the scenes are visited in a seeded
    order and scenes the edit does not apply to are skipped; every value drawn depends only on
    (seed, kind, scene index), so a larger `n_cases` extends the list without changing its start."""
    pools: dict[str, list[EditCase]] = {}
    for k, kind in enumerate(kinds):
        order = np.random.default_rng([seed, 1, k]).permutation(len(scenes))
        found: list[EditCase] = []
        for idx in order.tolist():
            try:
                e = apply_edit(scenes[idx], kind, np.random.default_rng([seed, 2, k, idx]))
            except EditNotApplicable:
                continue
            found.append(EditCase(f"{kind}-{idx:05d}", idx, kind, e.before, e.after, e.source, e.target))
            if len(found) == n_cases:
                break
        pools[kind] = found
    cases: list[EditCase] = []
    for r in range(max((len(p) for p in pools.values()), default=0)):
        for kind in kinds:
            if r < len(pools[kind]) and len(cases) < n_cases:
                cases.append(pools[kind][r])
    return cases


def differing_words(source: str, target: str) -> tuple[list[str], list[str]]:
    """(source words, target words) that the edit changes, function words left out: position by
    position for captions of equal length (what `replace` aligns), by diff otherwise."""
    s, t = [bare_word(w) for w in source.split()], [bare_word(w) for w in target.split()]
    if len(s) == len(t):
        src = [a for a, b in zip(s, t) if a != b]
        tgt = [b for a, b in zip(s, t) if a != b]
    else:
        src, tgt = [], []
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=s, b=t, autojunk=False).get_opcodes():
            if tag in ("replace", "delete"):
                src += s[i1:i2]
            if tag in ("replace", "insert"):
                tgt += t[j1:j2]

    def keep(words: list[str]) -> list[str]:
        return list(dict.fromkeys(w for w in words if w and w not in STOPWORDS))

    return keep(src), keep(tgt)


def caption_edit_config(source: str, target: str, cross_replace: float, self_replace: float, local_blend: bool,
                        blend_threshold: float, blend_start: float) -> P2PConfig:
    """The Prompt-to-Prompt edit that turns caption `source` into `target`: `replace` when both
    have the same number of words, `refine` otherwise, blending locally on the words that differ."""
    blend = None
    if local_blend:
        words = differing_words(source, target)
        if words[0] or words[1]:
            blend = words
    mode = "replace" if len(source.split()) == len(target.split()) else "refine"
    return P2PConfig(edit=mode, cross_replace=cross_replace, self_replace=self_replace, blend_words=blend,
                     blend_threshold=blend_threshold, blend_start=blend_start)


# ---------------------------------------------------------------- settings and shards


@dataclass(frozen=True)
class BenchmarkSettings:
    steps: int = 50
    guidance_scale: float = 7.5
    null_text_inner_steps: int = 10
    cross_replace: float = 0.8
    self_replace: float = 0.4
    local_blend: bool = True
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    # Cases inverted and edited together. Seconds are per case at this batch size; the scores
    # match one-at-a-time runs up to float rounding.
    batch_size: int = 16

    def p2p(self, case: EditCase) -> P2PConfig:
        return caption_edit_config(case.source_caption, case.target_caption, self.cross_replace, self.self_replace,
                                   self.local_blend, self.blend_threshold, self.blend_start)


def module_digest(module: torch.nn.Module) -> str:
    """Identity of a scoring model (CLIP, judge): the first values of every weight tensor."""
    h = hashlib.sha256()
    for name, w in module.named_parameters():
        h.update(name.encode())
        h.update(w.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(case: EditCase, method: str, settings: BenchmarkSettings | dict, models: dict[str, str]) -> str:
    """Everything a shard's content depends on."""
    settings = settings if isinstance(settings, dict) else asdict(settings)
    blob = json.dumps({"case": case.to_dict(), "method": method, "settings": settings, "models": models},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def shard_paths(work_dir: Path, method: str, case_id: str) -> tuple[Path, Path]:
    d = Path(work_dir) / method
    return d / f"{case_id}.json", d / f"{case_id}.png"


def read_shard(work_dir: Path, method: str, case: EditCase, fp: str) -> dict | None:
    """The shard's record if it exists, is complete and was made with the same fingerprint."""
    js, png = shard_paths(work_dir, method, case.case_id)
    if not (js.is_file() and png.is_file()):
        return None
    try:
        rec = json.loads(js.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("fingerprint") == fp else None


def read_shard_images(work_dir: Path, method: str, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(reconstruction, edit) stored side by side in the shard's PNG."""
    with Image.open(shard_paths(work_dir, method, case_id)[1]) as im:
        arr = np.asarray(im.convert("RGB"))
    w = arr.shape[1] // 2
    return arr[:, :w], arr[:, w:]


def scored(record: dict, case: EditCase, work_dir: Path, score: EditScorer) -> dict:
    """`record` with the scores of the images its shard stores added to its metrics (a shard
    keeps only what scoring cannot redo: seconds, memory, sizes)."""
    recon, edited = read_shard_images(work_dir, record["method"], case.case_id)
    metrics = score(case.edit, case.target_caption, recon if record["reconstruction"] else None, edited)
    return {**record, "metrics": {**record["metrics"], **{k: _clean(v) for k, v in metrics.items()}}}


# ---------------------------------------------------------------- numbers


def _clean(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else round(v, 5)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS))


# ---------------------------------------------------------------- running


@dataclass
class RunSummary:
    computed: int
    reused: int
    remaining: int

    @property
    def complete(self) -> bool:
        return self.remaining == 0


class EditBenchmark:
    """Runs and collects the shards of one benchmark configuration."""

    def __init__(self, pipe, renderer, scorer, judge, settings: BenchmarkSettings, work_dir: str | Path,
                 code: str = ""):
        """`code` names the code that computes shards (the stage passes a digest of its sources):
        a shard made by other code is computed again."""
        self.pipe, self.renderer = pipe, renderer
        self.score = EditScorer(renderer, scorer, judge)
        self.settings = settings
        self.work_dir = Path(work_dir)
        self.size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.models = {"pipeline": model_id(pipe), "world_size": str(renderer.size), "code": code}

    def fingerprint(self, case: EditCase, method: str) -> str:
        return fingerprint(case, method, self.settings, self.models)

    def _compute(self, cases: Sequence[EditCase], method: str) -> list[tuple[dict, bytes]]:
        """Shards of several cases inverted and edited as one batch; seconds are per case."""
        s = self.settings
        loaded = [load_image(render_edit(self.renderer, c.edit)[0], self.size) for c in cases]  # notes if resized
        started = time.perf_counter()
        invs = invert_batch(self.pipe, [img for img, _ in loaded], [c.source_caption for c in cases], method,
                            steps=s.steps, guidance_scale=s.guidance_scale, inner_steps=s.null_text_inner_steps)
        invert_seconds = (time.perf_counter() - started) / len(cases)
        started = time.perf_counter()
        outs = edit_inverted_batch(self.pipe, invs, [[c.target_caption] for c in cases], [s.p2p(c) for c in cases])
        edit_seconds = (time.perf_counter() - started) / len(cases)
        shards = []
        for case, (_, notes), out in zip(cases, loaded, outs):
            recon, edited = (_resize(x, self.renderer.size) for x in out[:2])
            buf = io.BytesIO()
            Image.fromarray(np.concatenate([recon, edited], 1)).save(buf, format="PNG")
            record = {"fingerprint": self.fingerprint(case, method), "method": method, "case": case.to_dict(),
                      "p2p": {"edit": case.mode, "blend_words": s.p2p(case).blend_words}, "notes": notes,
                      "reconstruction": True,
                      "metrics": {"invert_seconds": _clean(invert_seconds), "edit_seconds": _clean(edit_seconds)}}
            shards.append((record, buf.getvalue()))
        return shards

    def run(self, cases: Sequence[EditCase], methods: Sequence[str], limit: int | None = None,
            progress: bool = True) -> RunSummary:
        """Compute every missing (method, case) shard, at most `limit` of them in this call,
        `settings.batch_size` cases of one method at a time."""
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown inversion methods {unknown}; known: {METHODS}")
        pending = {m: [c for c in cases if read_shard(self.work_dir, m, c, self.fingerprint(c, m)) is None]
                   for m in methods}
        total = sum(len(p) for p in pending.values())
        reused = len(cases) * len(methods) - total
        budget = total if limit is None else min(limit, total)
        bar = tqdm(total=budget, desc="edit benchmark", dynamic_ncols=True, disable=not progress)
        done = 0
        for method, todo in pending.items():
            todo = todo[: budget - done]
            for i in range(0, len(todo), self.settings.batch_size):
                chunk = todo[i : i + self.settings.batch_size]
                for record, png in self._compute(chunk, method):
                    js, png_path = shard_paths(self.work_dir, method, record["case"]["case_id"])
                    atomic_write(png_path, png)  # the JSON goes last: its presence means the shard is whole
                    atomic_write(js, json.dumps(record, indent=1).encode())
                done += len(chunk)
                bar.update(len(chunk))
        bar.close()
        return RunSummary(computed=done, reused=reused, remaining=total - done)

    def records(self, cases: Sequence[EditCase], methods: Sequence[str]) -> list[dict]:
        """The finished shards of these cases and methods, scored, in case order."""
        out = []
        for c in cases:
            for m in methods:
                rec = read_shard(self.work_dir, m, c, self.fingerprint(c, m))
                if rec is not None:
                    out.append(scored(rec, c, self.work_dir, self.score))
        return out


# ---------------------------------------------------------------- reports


def _mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return round(float(np.mean(v)), 4) if v else None


def aggregate(records: Sequence[dict], methods: Sequence[str], kinds: Sequence[str] = KINDS,
              metrics: Sequence[str] = METRICS) -> dict:
    """{method: {"overall": {...}, "by_kind": {kind: {...}}}}: means of every metric (metrics
    undefined for a case, e.g. background PSNR when the edit changes every pixel, are left out of
    their mean) and the number of cases."""
    out: dict[str, dict] = {}
    for m in methods:
        rows = [r for r in records if r["method"] == m]
        groups = {"overall": rows, **{k: [r for r in rows if r["case"]["kind"] == k] for k in kinds}}
        summary = {}
        for name, group in groups.items():
            summary[name] = {"n": len(group), **{k: _mean(r["metrics"].get(k) for r in group) for k in metrics}}
        out[m] = {"overall": summary.pop("overall"), "by_kind": summary}
    return out


CSV_CASE_FIELDS = ("method", "case_id", "index", "kind", "before", "after", "mode", "source_caption", "target_caption")


def cases_csv(records: Sequence[dict], metrics: Sequence[str] = METRICS) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*CSV_CASE_FIELDS, *metrics])
    for r in records:
        c = r["case"]
        w.writerow([r["method"], c["case_id"], c["index"], c["kind"], c["before"], c["after"], c["mode"],
                    c["source_caption"], c["target_caption"],
                    *("" if r["metrics"].get(k) is None else r["metrics"][k] for k in metrics)])
    return buf.getvalue()


def edit_grid(bench, cases: Sequence[EditCase], methods: Sequence[str], per_kind: int = 2, scale: int = 3,
              kinds: Sequence[str] = KINDS) -> Image.Image | None:
    """Rows of input | ground truth | each method's edit, for the first `per_kind` cases of each
    kind that every method has finished. `bench` is an `EditBenchmark` or anything with its
    `renderer`, `work_dir` and `fingerprint`."""
    rows = []
    for kind in kinds:
        done = [c for c in cases if c.kind == kind
                and all(read_shard(bench.work_dir, m, c, bench.fingerprint(c, m)) for m in methods)]
        for c in done[:per_kind]:
            source, truth, _ = render_edit(bench.renderer, c.edit)
            edits = [read_shard_images(bench.work_dir, m, c.case_id)[1] for m in methods]
            rows.append(np.concatenate([source, truth, *edits], 1))
    if not rows:
        return None
    grid = Image.fromarray(np.concatenate(rows, 0))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
