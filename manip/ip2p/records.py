"""The records that flow through InstructPix2Pix dataset generation, and caption validation.

Every stage writes JSONL of these records sorted by id, so the same inputs give the same bytes.
Anything a stage cannot use becomes a `Rejected` record with a reason instead of an exception:
one bad caption or one junk LLM answer must not cost the rest of a run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from manip.training.checkpoint import atomic_write


@dataclass(frozen=True)
class Caption:
    id: str
    text: str
    scene: dict | None = None  # the EmojiWorld scene the caption describes, when known
    phrasing: int | None = None


@dataclass(frozen=True)
class CaptionEdit:
    id: str
    input: str
    edit: str
    output: str
    kind: str | None = None
    # Ground truth where the caption came from a known scene: {"source": scene, "target": scene}.
    truth: dict | None = None


@dataclass(frozen=True)
class Rejected:
    id: str
    input: str
    reason: str  # a short stable category, counted in reports
    detail: str = ""


def partition(results: Iterable[CaptionEdit | Rejected]) -> tuple[list[CaptionEdit], list[Rejected]]:
    """Split an editor's per-caption results into kept edits and rejections."""
    results = list(results)
    return ([r for r in results if isinstance(r, CaptionEdit)], [r for r in results if isinstance(r, Rejected)])


class CaptionError(ValueError):
    """A caption that cannot be used; `reason` is the short category reports count."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def check_caption(text: object, tokenizer=None, max_chars: int = 1000) -> str:
    """The caption with surrounding whitespace removed, or CaptionError. With a tokenizer the
    caption must fit its context (BOS and EOS included), since a truncated caption would
    describe a different image than the one generated from it."""
    if not isinstance(text, str):
        raise CaptionError("not text", f"expected a string, got {type(text).__name__}")
    text = " ".join(text.split())
    if not text:
        raise CaptionError("empty", "the caption is empty or only whitespace")
    if len(text) > max_chars:
        raise CaptionError("over-long", f"{len(text)} characters, over the limit of {max_chars}")
    if tokenizer is not None:
        n = len(tokenizer(text).input_ids)
        if n > tokenizer.model_max_length:
            raise CaptionError("over-long", f"{n} tokens, over the tokenizer limit of {tokenizer.model_max_length}")
    return text


def item_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator that depends only on the global seed and an item's identity (its id, a
    sample index), never on run order or how the work was split."""
    digest = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return np.random.default_rng([int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)])


def read_jsonl(path: str | Path, cls: type) -> list:
    return [cls(**json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: str | Path, records: Iterable) -> None:
    """Atomic, sorted by id, one compact JSON object per line."""
    rows = sorted((asdict(r) for r in records), key=lambda r: r["id"])
    atomic_write(Path(path), "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def iter_jsonl_bytes(path: str | Path) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, object or None, problem) for every non-blank line; lines that are not
    UTF-8 or not a JSON object are reported, not raised."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield n, None, f"not valid UTF-8 ({err.reason} at byte {err.start})"
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield n, None, f"not valid JSON ({err.msg})"
                continue
            if not isinstance(obj, dict):
                yield n, None, f"expected a JSON object, got {type(obj).__name__}"
                continue
            yield n, obj, ""
