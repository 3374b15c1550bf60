"""Helpers shared by the stage modules."""
from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

from pydantic import BaseModel

from manip.runtime import set_threads
from manip.training.checkpoint import atomic_write, replace_dir, staging_dir
from manip.training.loop import LoopConfig

from ._runner import StageInputError
from .params import LoopParams

ROOT = Path(__file__).resolve().parents[1]


def loop_config(p: LoopParams) -> LoopConfig:
    set_threads()
    return LoopConfig(steps=p.steps, lr=p.lr, warmup=p.warmup, ema_decay=p.ema_decay,
                      checkpoint_every=p.checkpoint_every)


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Loss curve as CSV for `dvc plots`."""
    keys = sorted({k for row in history for k in row} - {"step"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", *keys])
    w.writeheader()
    for row in history:
        w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write(path, buf.getvalue())


def fingerprint(section: BaseModel, seed: int) -> dict:
    """What a checkpoint must share with the current params to be resumed: everything except
    the step count, so raising `steps` continues a finished run."""
    d = section.model_dump()
    d.get("train", {}).pop("steps", None)
    return {"seed": seed, **d}


def require(path: Path, stage: str) -> Path:
    """Fail with the command that builds a missing input instead of a hub lookup error."""
    if not path.exists():
        raise StageInputError(f"{path} is missing: build it with `dvc repro {stage}`")
    return path


def save_pretrained(final: Path, *components) -> None:
    """`save_pretrained` of one or more objects into a folder that appears whole or not at all."""
    tmp = staging_dir(final)
    for component in components:
        component.save_pretrained(tmp)
    replace_dir(tmp, final)


def publish(metrics: dict, metrics_path: Path, histories: dict[Path, list[dict[str, float]]]) -> dict:
    """Write a stage's DVC metrics and loss curves, and print the metrics."""
    atomic_write(metrics_path, json.dumps(metrics, indent=1))
    for path, history in histories.items():
        write_history(path, history)
    print(json.dumps(metrics))
    return metrics


def files_digest(folder: Path) -> str:
    """The bytes of every file under `folder` (empty when it does not exist)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def code_digest(*paths: str) -> str:
    """The Python source under `paths` (files or folders of this checkout, whatever the working
    directory): resumable work, shards and runs, made by other code is not reused. List the same
    code as the stage's DVC deps: DVC reruns the stage when that code changes, and this makes the
    rerun redo the work instead of finding it done."""
    h = hashlib.sha256()
    for rel in paths:
        target = ROOT / rel
        for path in sorted(target.rglob("*.py")) if target.is_dir() else [target]:
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]
