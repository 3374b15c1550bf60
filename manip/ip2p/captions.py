"""Caption sources for dataset generation: EmojiWorld scenes, a JSONL file, or a text column of a
Hugging Face `datasets` dataset. Sources only read; `screen` then rejects bad captions with the
reason and their line or row instead of raising.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

from manip.multilingual.corpus import CAPTION_WRITERS
from manip.multilingual.language import Language
from manip.world.scene import Scene

from .records import Caption, CaptionError, Rejected, check_caption, item_rng, iter_jsonl_bytes


def world_captions(scenes: Sequence[Scene], seed: int, n: int, prefix: str = "world",
                   language: Language = "en") -> list[Caption]:
    """The first `n` scenes in `language`, each in a phrasing drawn from (seed, id), so the edits
    and the model see every word order the world's captions use."""
    n_phrasings, write = CAPTION_WRITERS[language]
    out = []
    for i, scene in enumerate(scenes[:n]):
        cid = f"{prefix}-{i:06d}"
        phrasing = int(item_rng(seed, "phrasing", cid).integers(n_phrasings))
        out.append(Caption(cid, write(scene, phrasing), scene.to_dict(), phrasing))
    return out


def jsonl_captions(path: str | Path, field: str = "caption", id_field: str | None = "id") -> tuple[list[Caption], list[Rejected]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} not found")
    rows: list[tuple[str, object]] = []  # texts are checked later by `screen`
    rejected: list[Rejected] = []
    for n, obj, problem in iter_jsonl_bytes(path):
        cid = f"line-{n:07d}"
        if obj is None:
            rejected.append(Rejected(cid, "", "unreadable", problem))
            continue
        if field not in obj:
            rejected.append(Rejected(cid, "", "no caption", f"line {n} has no {field!r} field"))
            continue
        if id_field and id_field in obj:
            cid = str(obj[id_field])
        rows.append((cid, obj[field]))
    return [Caption(cid, text) for cid, text in rows], rejected


class CaptionSourceError(ValueError):
    """A caption source that cannot be read as asked: the message names what is missing."""


def dataset_captions(source: str, column: str, split: str = "train") -> list[Caption]:
    """A text column of a dataset saved with `save_to_disk` (a folder) or loadable by name from the
    local Hugging Face cache (offline)."""
    import datasets

    path = Path(source)
    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(source, split=split)
    except (OSError, ValueError) as err:  # not a saved dataset, not in the offline cache, no such split
        raise CaptionSourceError(f"dataset {source!r} (split {split!r}) could not be loaded offline: "
                                 f"{type(err).__name__}: {str(err)[:300]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise CaptionSourceError(f"dataset {source} has no split {split!r}; it has {list(ds)}")
        ds = ds[split]
    if column not in ds.column_names:
        raise CaptionSourceError(f"dataset {source} has no column {column!r}; it has {ds.column_names}")
    return [Caption(f"row-{i:07d}", text) for i, text in enumerate(ds[column])]


def screen(captions: Iterable[Caption], tokenizer=None) -> tuple[list[Caption], list[Rejected]]:
    """Captions that pass `check_caption` (whitespace normalised); the rest, and repeated ids,
    rejected with the reason. With the tokenizer of the model that will draw them, captions
    too long for its context are rejected rather than silently truncated."""
    kept: list[Caption] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    for c in captions:
        shown = str(c.text)[:200]
        if c.id in seen:
            rejected.append(Rejected(c.id, shown, "duplicate id", f"id {c.id!r} appears more than once"))
            continue
        seen.add(c.id)
        try:
            kept.append(replace(c, text=check_caption(c.text, tokenizer)))
        except CaptionError as err:
            rejected.append(Rejected(c.id, shown, err.reason, err.detail))
    return kept, rejected
