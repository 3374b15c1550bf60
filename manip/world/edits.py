"""Single-attribute edits of a scene, rendered into exact ground truth.

Every edit names the attribute it changes, the before and after values, and comes with the
re-rendered target and the mask of pixels the edit is allowed to change.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .render import Renderer
from .scene import Placed, Scene
from .vocab import BACKGROUNDS, BASE_OBJECTS, COLOURS, STYLES, TIMES

EDIT_KINDS: tuple[str, ...] = ("object", "colour", "background", "time", "add", "remove", "style")


@dataclass(frozen=True)
class Edit:
    kind: str
    before: str
    after: str
    source: Scene
    target: Scene


class EditNotApplicable(ValueError):
    """The scene cannot take this kind of edit (e.g. adding a third object)."""


def _other(rng: np.random.Generator, options, current):
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def _pick_object(rng: np.random.Generator, scene: Scene) -> int:
    return int(rng.integers(len(scene.objects)))


def apply_edit(scene: Scene, kind: str, rng: np.random.Generator, objects=BASE_OBJECTS) -> Edit:
    """Change exactly one attribute of `scene`; values are drawn from `rng`."""
    objs = list(scene.objects)
    if kind == "object":
        i = _pick_object(rng, scene)
        new = _other(rng, objects, objs[i].name)
        before, objs[i] = objs[i].name, replace(objs[i], name=new)
        return Edit(kind, before, new, scene, scene.with_(objects=tuple(objs)))
    if kind == "colour":
        i = _pick_object(rng, scene)
        new = _other(rng, list(COLOURS), objs[i].colour)
        before, objs[i] = objs[i].colour, replace(objs[i], colour=new)
        return Edit(kind, before, new, scene, scene.with_(objects=tuple(objs)))
    if kind == "background":
        new = _other(rng, BACKGROUNDS, scene.background)
        return Edit(kind, scene.background, new, scene, scene.with_(background=new))
    if kind == "time":
        new = _other(rng, TIMES, scene.time)
        return Edit(kind, scene.time, new, scene, scene.with_(time=new))
    if kind == "style":
        new = _other(rng, STYLES, scene.style)
        return Edit(kind, scene.style, new, scene, scene.with_(style=new))
    if kind == "add":
        if len(objs) != 1 or objs[0].slot == "center":
            raise EditNotApplicable("adding needs one object in the left or right slot")
        slot = "right" if objs[0].slot == "left" else "left"
        name = objects[int(rng.integers(len(objects)))]
        added = Placed(name=name, colour="natural", slot=slot)
        return Edit(kind, "", name, scene, scene.with_(objects=(objs[0], added)))
    if kind == "remove":
        if len(objs) != 2:
            raise EditNotApplicable("removing needs two objects")
        i = _pick_object(rng, scene)
        return Edit(kind, objs[i].name, "", scene, scene.with_(objects=(objs[1 - i],)))
    raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")


def edit_mask(before: np.ndarray, after: np.ndarray, dilate: int = 1) -> np.ndarray:
    """Pixels the edit changed (any channel differs), grown by `dilate` pixels; bool HxW."""
    mask = np.any(before != after, axis=-1)
    for _ in range(dilate):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def render_edit(renderer: Renderer, edit: Edit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source image, ground-truth edited image, edit mask)."""
    src = renderer.render_array(edit.source)
    tgt = renderer.render_array(edit.target)
    return src, tgt, edit_mask(src, tgt)
