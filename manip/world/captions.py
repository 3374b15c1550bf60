"""Captions rendered from scene descriptions, in several phrasings.

Phrasing 0 is the canonical caption used for evaluation; training samples all of them
so the text encoder does not overfit one word order.
"""
from __future__ import annotations

from .scene import Placed, Scene

_BG_PHRASE = {
    "beach": "on the beach", "grass": "on the grass", "snow": "in the snow",
    "city": "in the city", "sky": "in the sky", "desert": "in the desert",
}
_TIME_PHRASE = {"day": "during the day", "sunset": "at sunset", "night": "at night"}
_TIME_ADJ = {"day": "sunny", "sunset": "sunset", "night": "night-time"}
_STYLE_PREFIX = {
    "photo": "a photo of ", "sketch": "a pencil sketch of ", "pixel-art": "pixel art of ",
    "inverted": "an inverted-colour image of ", "mosaic": "a mosaic of ",
}
_STYLE_SUFFIX = {
    "photo": "", "sketch": ", pencil sketch", "pixel-art": ", pixel art",
    "inverted": ", inverted colours", "mosaic": ", mosaic",
}
_SLOT_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}

N_PHRASINGS = 4


def object_phrase(obj: Placed, with_slot: bool = True) -> str:
    colour = "" if obj.colour == "natural" else f"{obj.colour} "
    article = "an" if (colour or obj.name)[0] in "aeiou" else "a"
    text = f"{article} {colour}{obj.name}"
    return f"{text} {_SLOT_PHRASE[obj.slot]}" if with_slot else text


def objects_phrase(scene: Scene) -> str:
    return " and ".join(object_phrase(o) for o in scene.ordered_objects())


def caption(scene: Scene, phrasing: int = 0) -> str:
    objs = objects_phrase(scene)
    bg, time, style = scene.background, scene.time, scene.style
    if phrasing == 0:
        return f"{_STYLE_PREFIX[style]}{objs}, {_BG_PHRASE[bg]} {_TIME_PHRASE[time]}"
    if phrasing == 1:
        return f"{objs} {_BG_PHRASE[bg]} {_TIME_PHRASE[time]}{_STYLE_SUFFIX[style]}"
    if phrasing == 2:
        return f"{bg} scene {_TIME_PHRASE[time]} with {objs}{_STYLE_SUFFIX[style]}"
    if phrasing == 3:
        return f"a {_TIME_ADJ[time]} {bg} with {objs}{_STYLE_SUFFIX[style]}"
    raise ValueError(f"phrasing must be in [0, {N_PHRASINGS}), got {phrasing}")


def all_captions(scene: Scene) -> list[str]:
    return [caption(scene, p) for p in range(N_PHRASINGS)]
