"""The published InstructPix2Pix dataset: Parquet files that `datasets.load_dataset(folder)` reads
with Image features, in the columns the diffusers `train_instruct_pix2pix.py` example expects
(`input_image`, `edit_prompt`, `edited_image`), plus the provenance of every pair and a dataset
card. The same shards give the same bytes.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from manip.training.checkpoint import atomic_write, replace_dir, staging_dir

from .records import CaptionEdit

IMAGE_COLUMNS = ("input_image", "edited_image")


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def rows_from_shards(shards: Iterable[tuple[np.ndarray, list[dict]]], edits: dict[str, CaptionEdit],
                     max_per_edit: int | None = None) -> list[dict]:
    """One row per kept pair, best directional similarity first within an edit (shards already
    keep them in that order)."""
    rows, per_edit = [], Counter()
    for pairs, kept in shards:
        for pair, k in zip(pairs, kept):
            if max_per_edit is not None and per_edit[k["id"]] >= max_per_edit:
                continue
            per_edit[k["id"]] += 1
            e = edits[k["id"]]
            rows.append({
                "input_image": {"bytes": png_bytes(pair[0]), "path": None}, "edit_prompt": e.edit,
                "edited_image": {"bytes": png_bytes(pair[1]), "path": None},
                "id": e.id, "input_caption": e.input, "output_caption": e.output, "kind": e.kind or "",
                "sample": k["sample"], "seed": k["seed"], "p": k["p"], "cfg": k["cfg"],
                "clip_text_input": k["clip_text_input"], "clip_text_output": k["clip_text_output"],
                "clip_direction": k["clip_direction"], "clip_image": k["clip_image"],
                "truth": json.dumps(e.truth, sort_keys=True) if e.truth else "",
            })
    return rows


def features():
    import datasets

    v = datasets.Value
    cols = {"input_image": datasets.Image(), "edit_prompt": v("string"), "edited_image": datasets.Image(),
            "id": v("string"), "input_caption": v("string"), "output_caption": v("string"), "kind": v("string"),
            "sample": v("int64"), "seed": v("int64"), "p": v("float64"), "cfg": v("float64"),
            "clip_text_input": v("float64"), "clip_text_output": v("float64"), "clip_direction": v("float64"),
            "clip_image": v("float64"), "truth": v("string")}
    return datasets.Features(cols)


def filter_report(tries: Sequence[dict], n_edits: int, rows: Sequence[dict]) -> dict:
    """Counts a reader needs to judge the filter: pass rate, rejections per reason (a try can
    fail for several), edits left without any pair. `rows` are the kept pairs (any dicts with
    the edit's "id")."""
    reasons = Counter(r for t in tries for r in t["reasons"])
    kept_edits = {r["id"] for r in rows}
    return {
        "edits": n_edits, "edits_with_pairs": len(kept_edits), "edits_without_pairs": n_edits - len(kept_edits),
        "tries": len(tries), "passed": sum(t["passed"] for t in tries), "pairs": len(rows),
        "pass_rate": round(sum(t["passed"] for t in tries) / max(1, len(tries)), 4),
        "rejections": dict(sorted(reasons.items())),
    }


def dataset_card(report: dict, rows: Sequence[dict], provenance: dict) -> str:
    header = ("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
              "task_categories:\n- image-to-image\n---\n")
    kinds = "\n".join(f"| {k or 'unlabelled'} | {n} |" for k, n in sorted(Counter(r["kind"] for r in rows).items()))
    rejections = "\n".join(f"| {k} | {n} |" for k, n in report["rejections"].items())
    return header + f"""
# InstructPix2Pix pairs

Generated image pairs for instruction-based editing: each row is an input image, an edit
instruction and the edited image, sampled with Prompt-to-Prompt from one shared noise for the
input and output captions, and kept only if it passed the CLIP filter.

- pairs: {report['pairs']} from {report['edits_with_pairs']} of {report['edits']} caption edits
- candidates drawn: {report['tries']}, passed the filter: {report['passed']} ({report['pass_rate']:.1%})

Columns: `input_image`, `edit_prompt`, `edited_image` (what `train_instruct_pix2pix.py` reads),
then `id`, `input_caption`, `output_caption`, `kind`, the candidate's `sample` index, noise `seed`,
Prompt-to-Prompt fraction `p` and guidance `cfg`, the four CLIP filter scores, and `truth` (the
ground-truth edited scene as JSON where the caption came from EmojiWorld).

| edit kind | pairs |
|---|---|
{kinds}

Rejections (a candidate can fail for several reasons):

| reason | candidates |
|---|---|
{rejections}

## Provenance

```json
{json.dumps(provenance, indent=1, sort_keys=True)}
```
"""


def load_published(folder: str | Path):
    """The dataset in `folder` as a `datasets.Dataset`, read straight from its Parquet files.

    `datasets.load_dataset(folder)` caches by the folder's name and its data-file pattern, so two
    projects' `data/ip2p/dataset` (same relative path, same layout) share one cache entry and the
    second silently gets the first one's rows; reading the files directly has no cache to go stale."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((Path(folder) / "data").glob("train-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no data/train-*.parquet under {folder}")
    return datasets.Dataset(pa.concat_tables([pq.read_table(f) for f in files]))


def write_dataset(out_dir: Path, rows: list[dict], card: str, rows_per_file: int = 2000) -> None:
    """Parquet files under `data/` and the card, published as one folder replacing any previous one."""
    import datasets

    tmp = staging_dir(out_dir)
    data = tmp / "data"
    data.mkdir()
    n_files = max(1, -(-len(rows) // rows_per_file))
    for i in range(n_files):
        chunk = rows[i * rows_per_file : (i + 1) * rows_per_file]
        ds = datasets.Dataset.from_list(chunk, features=features()) if chunk else datasets.Dataset.from_dict(
            {k: [] for k in features()}, features=features())
        ds.to_parquet(str(data / f"train-{i:05d}-of-{n_files:05d}.parquet"))
    atomic_write(tmp / "README.md", card)
    replace_dir(tmp, out_dir)
