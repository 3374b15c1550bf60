"""Scene descriptions: the single source of truth an image is rendered from."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from .vocab import ALL_STYLES, BACKGROUNDS, COLOURS, OBJECTS, SLOTS, TIMES


@dataclass(frozen=True)
class Placed:
    """One object instance. Pixel geometry is stored relative to the canvas so the same
    scene renders consistently at any resolution."""

    name: str
    colour: str
    slot: str
    dx: float = 0.0  # horizontal jitter, fraction of the canvas
    dy: float = 0.0
    scale: float = 1.0  # multiplier of the slot's nominal size

    def __post_init__(self) -> None:
        if self.name not in OBJECTS:
            raise ValueError(f"unknown object {self.name!r}; known: {sorted(OBJECTS)}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; known: {list(COLOURS)}")
        if self.slot not in SLOTS:
            raise ValueError(f"unknown slot {self.slot!r}; known: {list(SLOTS)}")


@dataclass(frozen=True)
class Scene:
    background: str
    time: str
    style: str
    objects: tuple[Placed, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {list(BACKGROUNDS)}")
        if self.time not in TIMES:
            raise ValueError(f"unknown time of day {self.time!r}; known: {list(TIMES)}")
        if self.style not in ALL_STYLES:
            raise ValueError(f"unknown style {self.style!r}; known: {list(ALL_STYLES)}")
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene holds one or two objects, got {len(self.objects)}")
        slots = [o.slot for o in self.objects]
        if len(slots) == 2 and sorted(slots) != ["left", "right"]:
            raise ValueError(f"two objects must fill the left and right slots, got {slots}")

    def with_(self, **changes) -> "Scene":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objs = tuple(Placed(**o) for o in d["objects"])
        return cls(background=d["background"], time=d["time"], style=d["style"], objects=objs)

    def ordered_objects(self) -> tuple[Placed, ...]:
        """Objects left to right, the order captions name them in."""
        return tuple(sorted(self.objects, key=lambda o: SLOTS.index(o.slot)))
