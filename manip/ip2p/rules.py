"""The offline caption-edit backend: edits drawn from the EmojiWorld scene grammar.

Each caption that describes a known scene gets one single-attribute edit (`manip.world.apply_edit`),
an instruction in one of several phrasings, the output caption in the input's own phrasing, and
the edited scene as ground truth, so a model trained on these pairs can be scored exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from manip.world.captions import caption
from manip.world.edits import EDIT_KINDS, Edit, EditNotApplicable, apply_edit
from manip.world.scene import Scene

from .records import Caption, CaptionEdit, Rejected, item_rng, partition

_BG = {"beach": "on the beach", "grass": "on the grass", "snow": "in the snow", "city": "in the city",
       "sky": "in the sky", "desert": "in the desert"}
_TIME = {"day": ("during the day", "daytime"), "sunset": ("at sunset", "sunset"), "night": ("at night", "night")}
_STYLE = {"photo": ("a photo", "a photograph"), "sketch": ("a pencil sketch", "a pencil drawing"),
          "pixel-art": ("pixel art", "a pixel-art picture"), "inverted": ("an inverted-colour image", "a colour negative")}

# Instruction phrasings per edit kind; {fields} are filled from the edit.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": ("turn the {before} into {after_a}", "replace the {before} with {after_a}", "make the {before} {after_a}",
               "change the {before} to {after_a}", "swap the {before} for {after_a}"),
    "colour": ("make the {obj} {after}", "paint the {obj} {after}", "turn the {obj} {after}",
               "colour the {obj} {after}", "give the {obj} a {after} colour"),
    "colour-natural": ("give the {obj} its natural colours", "take the {before} tint off the {obj}",
                       "make the {obj} its usual colour"),
    "background": ("put it {bg}", "move the scene {bg}", "change the background to {bg_word}",
                   "set everything {bg}", "make the setting {bg_word}"),
    "time": ("make it {time_word}", "set it {time}", "change the time to {time_word}", "let it be {time_word}"),
    "style": ("make it {style}", "turn it into {style_alt}", "render it as {style}", "redo it as {style_alt}"),
    "add": ("add {after_a} on the {slot}", "put {after_a} on the {slot}", "place {after_a} on the {slot}",
            "include {after_a} {slot_phrase}"),
    "remove": ("remove the {before}", "take away the {before}", "get rid of the {before}", "delete the {before}",
               "erase the {before}"),
}


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _refer(scene: Scene, name: str, slot: str) -> str:
    """The object's name, with its slot when another object shares the name."""
    twins = sum(o.name == name for o in scene.objects)
    return f"{name} on the {slot}" if twins > 1 else name


def instruction(edit: Edit, rng: np.random.Generator) -> str:
    src, tgt = edit.source, edit.target
    fields: dict[str, str] = {"before": edit.before, "after": edit.after}
    kind = edit.kind
    if kind == "object":
        i = next(k for k, (a, b) in enumerate(zip(src.objects, tgt.objects)) if a.name != b.name)
        fields.update(before=_refer(src, edit.before, src.objects[i].slot), after_a=_a(edit.after))
    elif kind == "colour":
        i = next(k for k, (a, b) in enumerate(zip(src.objects, tgt.objects)) if a.colour != b.colour)
        fields["obj"] = _refer(src, src.objects[i].name, src.objects[i].slot)
        kind = "colour-natural" if edit.after == "natural" else kind
    elif kind == "background":
        fields.update(bg=_BG[edit.after], bg_word=f"the {edit.after}" if edit.after != "grass" else "grass")
    elif kind == "time":
        fields.update(time=_TIME[edit.after][0], time_word=_TIME[edit.after][1])
    elif kind == "style":
        fields.update(style=_STYLE[edit.after][0], style_alt=_STYLE[edit.after][1])
    elif kind == "add":
        slot = tgt.objects[-1].slot
        fields.update(after_a=_a(edit.after), slot=slot, slot_phrase=f"on the {slot} side")
    elif kind == "remove":
        gone = next(o for o in src.objects if o not in tgt.objects)
        fields["before"] = _refer(src, gone.name, gone.slot)
    options = TEMPLATES[kind]
    return options[int(rng.integers(len(options)))].format(**fields)


class RulesEditor:
    """One edit per caption; the kind, its values and the phrasing all come from (seed, caption id)."""

    name = "rules"

    def __init__(self, seed: int, kinds: Sequence[str] = EDIT_KINDS):
        unknown = sorted(set(kinds) - set(EDIT_KINDS))
        if unknown or not kinds:
            raise ValueError(f"unknown edit kinds {unknown}; choose from {list(EDIT_KINDS)}")
        self.seed, self.kinds = seed, tuple(kinds)

    def edit_one(self, c: Caption, kinds: Sequence[str] | None = None) -> CaptionEdit | Rejected:
        """One edit of caption `c`, of one of `kinds` (default: all of this editor's)."""
        if c.scene is None or c.phrasing is None:
            return Rejected(c.id, c.text, "no scene",
                            "the rules backend edits EmojiWorld captions only; use the openai backend for free text")
        scene = Scene.from_dict(c.scene)
        rng = item_rng(self.seed, "edit", c.id)
        # Kinds in a seeded order; a scene that cannot take one (adding a third object) takes the next.
        kinds = self.kinds if kinds is None else tuple(kinds)
        for kind in [kinds[k] for k in rng.permutation(len(kinds))]:
            try:
                e = apply_edit(scene, kind, rng)
            except EditNotApplicable:
                continue
            return CaptionEdit(c.id, c.text, instruction(e, rng), caption(e.target, c.phrasing), e.kind,
                               {"source": e.source.to_dict(), "target": e.target.to_dict()})
        return Rejected(c.id, c.text, "no applicable edit", f"none of {list(kinds)} applies to this scene")

    def edit_all(self, captions: Sequence[Caption], progress: bool = False,
                 balanced: bool = False) -> tuple[list[CaptionEdit], list[Rejected]]:
        """With `balanced` (an evaluation set), kinds take turns, each going to the next caption
        whose scene can take it, until the captions or the applicable kinds run out."""
        if not balanced:
            return partition(self.edit_one(c) for c in captions)
        pending, results, live = list(captions), [], list(self.kinds)
        turn = 0
        while pending and live:
            kind = live[turn % len(live)]
            hit = next(((j, r) for j, c in enumerate(pending)
                        if isinstance(r := self.edit_one(c, [kind]), CaptionEdit)), None)
            if hit is None:
                live.remove(kind)
                continue
            results.append(hit[1])
            pending.pop(hit[0])
            turn += 1
        return partition([*results, *(self.edit_one(c) for c in pending)])
