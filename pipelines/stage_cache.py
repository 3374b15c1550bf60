"""Content keys of DVC stages, for Prefect's task cache.

A stage's key hashes what DVC itself compares before it decides a stage is up to date: the
command, the values of the params it declares in dvc.yaml, and the content of every dep (md5 of
each file, as DVC records them in dvc.lock). Argument values alone would not do: a flow re-run
after a data or code change must not reuse the old outcome. The digest of a stage's outs is
kept with the cached result, so a cache hit whose outputs were since deleted or changed is
recomputed rather than trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

CHUNK = 1 << 20
MISSING = "missing"


class Hasher:
    """md5 of files and folders. A file's md5 is remembered by (path, inode, size, mtime), as
    DVC's own state database does, so a flow re-run re-reads nothing that did not change."""

    _memo: dict[tuple, str] = {}

    def __init__(self, root: Path):
        self.root = Path(root)

    def file_md5(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in self._memo:
            h = hashlib.md5()
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
            self._memo[key] = h.hexdigest()
        return self._memo[key]

    def __call__(self, rel: str) -> str:
        path = (self.root / rel).resolve()
        if path.is_file():
            return self.file_md5(path)
        if not path.is_dir():
            return MISSING
        listing = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in sorted(filenames):
                f = Path(dirpath) / name
                listing.append([f.relative_to(path).as_posix(), self.file_md5(f)])
        return hashlib.md5(json.dumps(listing).encode()).hexdigest() + ".dir"


def dvc_paths(entries) -> list[str]:
    """Paths of a deps/outs/metrics/plots list, whose items are `path` or `{path: options}`."""
    out = []
    for e in entries or []:
        out.extend([e] if isinstance(e, str) else list(e))
    return out


def stage_spec(root: Path, stage: str) -> dict:
    spec = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    if stage not in spec:
        raise KeyError(f"stage {stage!r} is not in {root / 'dvc.yaml'}")
    return spec[stage]


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def declared_params(root: Path, spec: dict) -> dict[str, Any]:
    """{file:key: value} of the params a stage lists (`key` in params.yaml, or `{file: [keys]}`)."""
    files: dict[str, Any] = {}

    def load(name: str) -> Any:
        if name not in files:
            path = root / name
            files[name] = yaml.safe_load(path.read_text()) if path.is_file() else None
        return files[name]

    values: dict[str, Any] = {}
    for entry in spec.get("params") or []:
        if isinstance(entry, str):
            values[f"params.yaml:{entry}"] = _lookup(load("params.yaml"), entry)
        else:
            for name, keys in entry.items():
                data = load(name)
                for key in keys or []:
                    values[f"{name}:{key}"] = _lookup(data, key)
                if not keys:
                    values[f"{name}:"] = data
    return values


def inputs_key(root: Path, stage: str) -> str:
    """sha256 over the checkout, the stage's command, declared params and deps' content (two
    checkouts never share an outcome: each has its own outputs and dvc.lock)."""
    spec = stage_spec(root, stage)
    hasher = Hasher(root)
    wdir = spec.get("wdir", ".")
    payload = {
        "repo": str(Path(root).resolve()), "stage": stage, "cmd": spec.get("cmd"),
        "params": declared_params(root, spec),
        "deps": {p: hasher(os.path.join(wdir, p)) for p in dvc_paths(spec.get("deps"))},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def outputs_state(root: Path, stage: str) -> dict[str, Any]:
    """What a cached outcome is checked against before it is reused: the md5 of the stage's
    outs, metrics and plots as they are now, and its dvc.lock entry (a lock reverted or edited
    by hand makes DVC run the stage again, so the flow must not skip it)."""
    spec = stage_spec(root, stage)
    hasher = Hasher(root)
    wdir = spec.get("wdir", ".")
    lock_path = root / "dvc.lock"
    lock = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}).get(stage) if lock_path.is_file() else None
    return {"outs": {p: hasher(os.path.join(wdir, p)) for key in ("outs", "metrics", "plots")
                     for p in dvc_paths(spec.get(key))},
            "lock": hashlib.sha256(json.dumps(lock, sort_keys=True, default=str).encode()).hexdigest()}
