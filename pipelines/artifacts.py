"""Helpers for Prefect artifacts: images inline in markdown."""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from PIL import Image

MAX_SIDE = 768  # px of the inline grid
MAX_BYTES = 150_000  # of the PNG (base64 adds a third), to keep the artifact small


def grid_data_uri(path: Path, max_side: int = MAX_SIDE, max_bytes: int = MAX_BYTES) -> str:
    """The grid as a PNG data URI, shrunk by whole factors (box filter: the grid is a NEAREST
    upscale, so this recovers its pixels) until it fits `max_side` and `max_bytes`."""
    img = Image.open(path).convert("RGB")
    factor = max(1, math.ceil(max(img.size) / max_side))
    while True:
        small = img.resize((max(1, img.width // factor), max(1, img.height // factor)), Image.BOX)
        buf = io.BytesIO()
        small.save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes or min(small.size) <= 64:
            return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        factor *= 2
