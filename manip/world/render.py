"""Deterministic renderer: scene description -> RGB image.

Backgrounds are smooth (gradients and flat shapes, no per-pixel noise) so a small VAE can
reconstruct them; the detail that matters lives in the emoji artwork.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from .artwork import Artwork
from .scene import Placed, Scene
from .vocab import COLOURS, SLOTS

_SUPERSAMPLE = 4
_HORIZON = 0.55
_SLOT_X = {"left": 0.25, "center": 0.5, "right": 0.75}
_OBJ_Y = 0.64
_SIZE_ONE, _SIZE_TWO = 0.46, 0.40

_SKY = {  # (top, bottom) colours of the sky gradient
    "day": ((70, 140, 230), (175, 215, 250)),
    "sunset": ((60, 40, 110), (250, 140, 70)),
    "night": ((8, 12, 35), (35, 45, 90)),
}
_GROUND_LIGHT = {"day": (1.0, 1.0, 1.0), "sunset": (1.0, 0.78, 0.62), "night": (0.35, 0.38, 0.55)}


def _gradient(h: int, w: int, top, bottom) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    return (np.array(top) * (1 - t) + np.array(bottom) * t) * np.ones((1, w, 1))


def _light(colour, time: str) -> tuple[int, int, int]:
    return tuple(int(c * f) for c, f in zip(colour, _GROUND_LIGHT[time]))


@lru_cache(maxsize=None)
def background(kind: str, time: str, size: int) -> Image.Image:
    """Background plate; cached since there are only |backgrounds| x |times| of them."""
    s = size * _SUPERSAMPLE
    sky = _gradient(s, s, *_SKY[time]).astype(np.uint8)
    img = Image.fromarray(sky, "RGB")
    d = ImageDraw.Draw(img)
    hz = int(s * _HORIZON)
    if time == "day":
        d.ellipse([0.78 * s, 0.06 * s, 0.92 * s, 0.20 * s], fill=(255, 230, 90))
    elif time == "sunset":
        d.ellipse([0.40 * s, 0.38 * s, 0.60 * s, 0.58 * s], fill=(255, 120, 50))
    else:
        d.ellipse([0.10 * s, 0.06 * s, 0.22 * s, 0.18 * s], fill=(235, 235, 210))
        d.ellipse([0.13 * s, 0.04 * s, 0.25 * s, 0.16 * s], fill=_SKY["night"][0])
    L = lambda c: _light(c, time)  # noqa: E731
    if kind == "beach":
        d.rectangle([0, hz - 0.05 * s, s, hz + 0.08 * s], fill=L((40, 110, 200)))
        d.rectangle([0, hz + 0.08 * s, s, s], fill=L((235, 210, 150)))
    elif kind == "grass":
        d.rectangle([0, hz, s, s], fill=L((80, 165, 60)))
        d.ellipse([-0.3 * s, hz - 0.12 * s, 0.6 * s, hz + 0.2 * s], fill=L((95, 180, 70)))
    elif kind == "snow":
        d.polygon([(0.05 * s, hz), (0.35 * s, 0.25 * s), (0.65 * s, hz)], fill=L((150, 160, 180)))
        d.polygon([(0.27 * s, 0.33 * s), (0.35 * s, 0.25 * s), (0.43 * s, 0.33 * s)], fill=L((250, 250, 255)))
        d.rectangle([0, hz, s, s], fill=L((235, 240, 250)))
    elif kind == "city":
        heights = (0.30, 0.18, 0.38, 0.24, 0.33, 0.15, 0.27)
        bw = s / len(heights)
        for i, h in enumerate(heights):
            d.rectangle([i * bw + 2, hz - h * s, (i + 1) * bw - 2, hz], fill=L((105, 105, 120)))
        d.rectangle([0, hz, s, s], fill=L((75, 75, 82)))
    elif kind == "sky":
        for cx, cy, r in ((0.2, 0.62, 0.10), (0.55, 0.75, 0.13), (0.85, 0.58, 0.09), (0.45, 0.3, 0.08)):
            d.ellipse([(cx - 1.6 * r) * s, (cy - r) * s, (cx + 1.6 * r) * s, (cy + r) * s], fill=L((245, 245, 250)))
    elif kind == "desert":
        xs = np.linspace(0, s, 65)
        top = hz + 0.05 * s * np.sin(xs / s * 2 * np.pi * 1.5)
        d.polygon([(0, s)] + list(zip(xs.tolist(), top.tolist())) + [(s, s)], fill=L((225, 170, 90)))
    else:
        raise ValueError(f"unknown background {kind!r}")
    return img.resize((size, size), Image.LANCZOS)


def _tint(sprite: Image.Image, colour: str) -> Image.Image:
    rgb = COLOURS[colour]
    if rgb is None:
        return sprite
    arr = np.asarray(sprite).astype(np.float32)
    lum = (0.299 * arr[..., 0] + 0.587 * arr[..., 1] + 0.114 * arr[..., 2]) / 255.0
    tinted = (0.3 + 0.9 * lum)[..., None] * np.array(rgb, np.float32)
    out = np.clip(0.2 * arr[..., :3] + 0.8 * tinted, 0, 255)
    return Image.fromarray(np.concatenate([out, arr[..., 3:]], -1).astype(np.uint8), "RGBA")


def object_box(obj: Placed, n_objects: int, size: int) -> tuple[int, int, int]:
    """Top-left corner and side length of an object's sprite in pixels."""
    side = int(round((_SIZE_ONE if n_objects == 1 else _SIZE_TWO) * obj.scale * size))
    cx = (_SLOT_X[obj.slot] + obj.dx) * size
    cy = (_OBJ_Y + obj.dy) * size
    return int(round(cx - side / 2)), int(round(cy - side / 2)), side


def _stylise(img: Image.Image, style: str) -> Image.Image:
    size = img.size[0]
    if style == "photo":
        return img
    if style == "sketch":
        gray = img.convert("L")
        edges = gray.filter(ImageFilter.FIND_EDGES)
        lines = ImageOps.invert(edges.point(lambda v: min(255, v * 3)))
        paper = Image.blend(lines, Image.new("L", img.size, 250), 0.15)
        return ImageOps.colorize(paper, (60, 50, 40), (250, 248, 240))
    if style == "pixel-art":
        small = img.resize((size // 4, size // 4), Image.BOX)
        return ImageOps.posterize(small, 3).resize(img.size, Image.NEAREST)
    if style == "inverted":
        return ImageOps.invert(img)
    if style == "mosaic":
        block = max(size // 16, 2)
        tiles = img.resize((size // block, size // block), Image.BOX).resize(img.size, Image.NEAREST)
        arr = np.asarray(tiles).copy()
        arr[::block, :] = (40, 40, 40)
        arr[:, ::block] = (40, 40, 40)
        return Image.fromarray(arr, "RGB")
    raise ValueError(f"unknown style {style!r}")


class Renderer:
    """Renders scenes at a fixed resolution; sprites are resized once per (object, colour, side)."""

    def __init__(self, artwork: Artwork, size: int = 64):
        if size < 32 or size % 8:
            raise ValueError(f"image size must be a multiple of 8 and at least 32, got {size}")
        self.artwork = artwork
        self.size = size
        self._sprites: dict[tuple[str, str, int], Image.Image] = {}

    def _sprite(self, name: str, colour: str, side: int) -> Image.Image:
        key = (name, colour, side)
        if key not in self._sprites:
            base = self.artwork.sprite(name).resize((side, side), Image.LANCZOS)
            self._sprites[key] = _tint(base, colour)
        return self._sprites[key]

    def render(self, scene: Scene) -> Image.Image:
        img = background(scene.background, scene.time, self.size).copy()
        n = len(scene.objects)
        for obj in sorted(scene.objects, key=lambda o: SLOTS.index(o.slot)):
            x, y, side = object_box(obj, n, self.size)
            sprite = self._sprite(obj.name, obj.colour, side)
            img.paste(sprite, (x, y), sprite)
        return _stylise(img, scene.style)

    def render_array(self, scene: Scene) -> np.ndarray:
        return np.asarray(self.render(scene), dtype=np.uint8)
