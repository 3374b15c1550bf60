"""Stage `world`: render every EmojiWorld split to data/world/<split>/."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from manip.training.checkpoint import replace_dir, staging_dir
from manip.world import Artwork, Renderer
from manip.world.dataset import render_split, write_split

from ._runner import main
from .params import Params, load_params

OUT = Path("data/world")


def preview(images: np.ndarray, n: int = 8) -> Image.Image:
    n = max(1, min(n, len(images)))  # a split smaller than one row still gets a preview
    k = min(n * n, len(images))
    rows = [np.concatenate(list(images[i : i + n]), 1) for i in range(0, k - k % n, n)]
    return Image.fromarray(np.concatenate(rows, 0))


def build(params: Params, out: Path = OUT) -> None:
    w = params.world
    renderer = Renderer(Artwork(w.artwork_dir), w.size)
    tmp = staging_dir(out)
    counts = {"train": w.n_train, "val": w.n_val, "test": w.n_test, "concepts": w.n_concepts}
    for split, n in counts.items():
        images, rows = render_split(renderer, params.seed, split, n)
        write_split(tmp / split, images, rows)
        preview(images).save(tmp / split / "preview.png")
    replace_dir(tmp, out)


if __name__ == "__main__":
    main(lambda: build(load_params()))
