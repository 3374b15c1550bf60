"""The closed vocabulary of EmojiWorld.

Every attribute is a small finite set so that each rendered image has an exact scene
description, and every edit has a ground-truth render.
"""
from __future__ import annotations

# Object classes: caption word -> emoji-datasource short name.
OBJECTS: dict[str, str] = {
    "cat": "cat2", "dog": "dog2", "rabbit": "rabbit2", "cow": "cow2", "pig": "pig2",
    "horse": "racehorse", "sheep": "sheep", "monkey": "monkey", "chicken": "chicken",
    "frog": "frog", "turtle": "turtle", "fish": "fish", "octopus": "octopus",
    "snail": "snail", "butterfly": "butterfly", "bee": "bee", "crab": "crab",
    "elephant": "elephant", "owl": "owl", "whale": "whale", "apple": "apple",
    "banana": "banana", "grapes": "grapes", "watermelon": "watermelon",
    "strawberry": "strawberry", "pineapple": "pineapple", "carrot": "carrot",
    "pizza": "pizza", "burger": "hamburger", "donut": "doughnut", "car": "car",
    "bicycle": "bike", "rocket": "rocket", "airplane": "airplane", "sailboat": "boat",
    "umbrella": "umbrella", "guitar": "guitar", "house": "house", "tree": "deciduous_tree",
    "mushroom": "mushroom", "sunflower": "sunflower", "key": "key", "balloon": "balloon",
    "crown": "crown",
    # Reserved concepts: never shown to base training, learnt later by customization runs.
    "teapot": "teapot", "robot": "robot_face", "cactus": "cactus", "penguin": "penguin",
}
RESERVED_OBJECTS: tuple[str, ...] = ("teapot", "robot", "cactus", "penguin")
BASE_OBJECTS: tuple[str, ...] = tuple(o for o in OBJECTS if o not in RESERVED_OBJECTS)

# Tints applied to the artwork; "natural" keeps the original colours and is not named in captions.
COLOURS: dict[str, tuple[int, int, int] | None] = {
    "natural": None, "red": (225, 40, 40), "green": (40, 190, 60), "blue": (40, 90, 230),
    "yellow": (240, 210, 40), "purple": (150, 60, 200),
}
BACKGROUNDS: tuple[str, ...] = ("beach", "grass", "snow", "city", "sky", "desert")
TIMES: tuple[str, ...] = ("day", "sunset", "night")
# Horizontal slots; a two-object scene fills "left" and "right".
SLOTS: tuple[str, ...] = ("left", "center", "right")
STYLES: tuple[str, ...] = ("photo", "sketch", "pixel-art", "inverted")
RESERVED_STYLES: tuple[str, ...] = ("mosaic",)
ALL_STYLES: tuple[str, ...] = STYLES + RESERVED_STYLES
