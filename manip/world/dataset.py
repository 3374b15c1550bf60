"""On-disk form of a rendered split: `images.npy` (N,H,W,3 uint8) and `scenes.jsonl`.

A plain uint8 array is memory-mapped by training loops with no decoding cost; the JSONL
rows carry the scene description and every caption phrasing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .captions import all_captions
from .render import Renderer
from .sampling import sample_scene, scene_rng
from .scene import Scene


@dataclass
class WorldSplit:
    images: np.ndarray  # (N, H, W, 3) uint8, possibly memory-mapped
    scenes: list[Scene]
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.scenes)


def render_split(renderer: Renderer, seed: int, split: str, n: int) -> tuple[np.ndarray, list[dict]]:
    images = np.empty((n, renderer.size, renderer.size, 3), np.uint8)
    rows = []
    for i in tqdm(range(n), desc=f"render {split}", dynamic_ncols=True, mininterval=2):
        scene = sample_scene(scene_rng(seed, split, i), split)
        images[i] = renderer.render_array(scene)
        rows.append({"index": i, "scene": scene.to_dict(), "captions": all_captions(scene)})
    return images, rows


def write_split(directory: Path, images: np.ndarray, rows: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "images.npy", images, allow_pickle=False)
    with open(directory / "scenes.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def load_split(directory: str | Path, mmap: bool = True) -> WorldSplit:
    directory = Path(directory)
    if not (directory / "images.npy").is_file():
        raise FileNotFoundError(f"no EmojiWorld split at {directory}: build it with `dvc repro world`")
    images = np.load(directory / "images.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
    rows = [json.loads(line) for line in open(directory / "scenes.jsonl")]
    return WorldSplit(images, [Scene.from_dict(r["scene"]) for r in rows], [r["captions"] for r in rows])
