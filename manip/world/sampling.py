"""Seeded scene sampling and the train / val / test / concepts splits.

Test scenes use only (object, background) pairs that never occur in train or val, so the
benchmark measures composition, not memorisation. Reserved objects and styles appear only in
the `concepts` split, which customization runs learn from.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .scene import Placed, Scene
from .vocab import BACKGROUNDS, BASE_OBJECTS, COLOURS, RESERVED_OBJECTS, RESERVED_STYLES, STYLES, TIMES

SPLITS: tuple[str, ...] = ("train", "val", "test", "concepts")


def held_out_background(obj: str) -> str:
    """The one background each base object is never seen on in training."""
    return BACKGROUNDS[BASE_OBJECTS.index(obj) % len(BACKGROUNDS)]


@dataclass(frozen=True)
class SceneDistribution:
    """Attribute frequencies; plain photos and natural colours dominate like real captions."""

    p_two_objects: float = 0.3
    p_natural_colour: float = 0.6
    p_photo_style: float = 0.7


def _choice(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _layout(rng: np.random.Generator) -> dict[str, float]:
    """The placement jitter captions never mention."""
    return {"dx": round(float(rng.uniform(-0.04, 0.04)), 4), "dy": round(float(rng.uniform(-0.04, 0.04)), 4),
            "scale": round(float(rng.uniform(0.9, 1.1)), 4)}


def _placed(rng: np.random.Generator, name: str, slot: str, dist: SceneDistribution) -> Placed:
    colours = list(COLOURS)
    colour = "natural" if rng.random() < dist.p_natural_colour else _choice(rng, colours[1:])
    return Placed(name=name, colour=colour, slot=slot, **_layout(rng))


def resample_layout(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene description with fresh placement jitter: another real render of exactly
    the same caption (the fair real-vs-real reference for samples of that caption)."""
    return scene.with_(objects=tuple(replace(o, **_layout(rng)) for o in scene.objects))


def _is_held_out(scene: Scene) -> bool:
    return any(o.name in BASE_OBJECTS and held_out_background(o.name) == scene.background for o in scene.objects)


def sample_scene(rng: np.random.Generator, split: str, dist: SceneDistribution = SceneDistribution()) -> Scene:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    objects_pool = RESERVED_OBJECTS if split == "concepts" else BASE_OBJECTS
    if split == "concepts":
        style = _choice(rng, RESERVED_STYLES) if rng.random() < 0.2 else _choice(rng, STYLES[:1] + STYLES)
    else:
        style = "photo" if rng.random() < dist.p_photo_style else _choice(rng, STYLES[1:])
    time = _choice(rng, TIMES)
    two = rng.random() < dist.p_two_objects
    while True:
        first = _choice(rng, objects_pool)
        names = [first, _choice(rng, BASE_OBJECTS if split == "concepts" else objects_pool)] if two else [first]
        slots = ["left", "right"] if two else [_choice(rng, ("left", "center", "right"))]
        background = held_out_background(first) if split == "test" else _choice(rng, BACKGROUNDS)
        scene = Scene(
            background=background, time=time, style=style,
            objects=tuple(_placed(rng, n, s, dist) for n, s in zip(names, slots)),
        )
        if split in ("train", "val") and _is_held_out(scene):
            continue
        return scene


SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each scene's randomness depends only on (seed, split, index): shards can be built in any order."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index])
