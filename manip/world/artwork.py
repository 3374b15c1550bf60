"""Emoji artwork from the npm package `emoji-datasource-google` (images Apache-2.0)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from PIL import Image

from .vocab import OBJECTS

INSTALL_HINT = (
    "install the artwork with `make artwork` (it runs `npm pack emoji-datasource-google@16.0.0` "
    "and unpacks it under .cache/), or point `world.artwork_dir` in params.yaml at an unpacked copy"
)


class ArtworkMissing(FileNotFoundError):
    pass


class Artwork:
    """Loads each object's 64 px RGBA sprite once."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = self.root / "emoji.json"
        if not index.is_file():
            raise ArtworkMissing(f"no emoji artwork at {self.root} (missing emoji.json): {INSTALL_HINT}")
        by_short: dict[str, str] = {}
        for entry in json.loads(index.read_text()):
            for short in entry["short_names"]:
                by_short[short] = entry["image"]
        self._files: dict[str, Path] = {}
        for word, short in OBJECTS.items():
            path = self.root / "img" / "google" / "64" / by_short[short]
            if not path.is_file():
                raise ArtworkMissing(f"emoji image {path} for {word!r} is missing: {INSTALL_HINT}")
            self._files[word] = path

    @lru_cache(maxsize=None)
    def sprite(self, name: str) -> Image.Image:
        with Image.open(self._files[name]) as im:
            return im.convert("RGBA")
