"""The offline caption-edit backend: edits drawn from the EmojiWorld scene grammar.

Each caption that describes a known scene gets one single-attribute edit (`manip.world.apply_edit`),
an instruction in one of several phrasings, the output caption in the input's own phrasing, and
the edited scene as ground truth, so a model trained on these pairs can be scored exactly. The
instruction and the output caption are in the input caption's language, English or Russian.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from manip.multilingual.language import Language, LanguageError, detect_language
from manip.multilingual.corpus import CAPTION_WRITERS
from manip.multilingual.russian import BACKGROUNDS_RU, COLOURS_RU, OBJECTS_RU, SLOTS_RU
from manip.world.edits import EDIT_KINDS, Edit, EditNotApplicable, apply_edit
from manip.world.scene import Placed, Scene

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


@dataclass(frozen=True)
class Change:
    """What an edit changed, in words neither language owns: the template kind and the object
    it names (the changed, added or removed one), with whether another object shares its name,
    so the instruction says which one."""

    kind: str
    obj: Placed | None = None
    twin: bool = False


def change_of(edit: Edit) -> Change:
    src, tgt = edit.source, edit.target
    if edit.kind == "object":
        obj = next(a for a, b in zip(src.objects, tgt.objects) if a.name != b.name)
    elif edit.kind == "colour":
        obj = next(a for a, b in zip(src.objects, tgt.objects) if a.colour != b.colour)
    elif edit.kind == "add":
        obj = tgt.objects[-1]
    elif edit.kind == "remove":
        obj = next(o for o in src.objects if o not in tgt.objects)
    else:
        return Change(edit.kind)
    kind = "colour-natural" if edit.kind == "colour" and edit.after == "natural" else edit.kind
    return Change(kind, obj, sum(o.name == obj.name for o in src.objects) > 1)


def _pick(options: Sequence[str], rng: np.random.Generator, **fields: str) -> str:
    return options[int(rng.integers(len(options)))].format(**fields)


def instruction(edit: Edit, rng: np.random.Generator) -> str:
    change = change_of(edit)
    fields: dict[str, str] = {"before": edit.before, "after": edit.after}
    if change.obj is not None:
        named = f"{change.obj.name} on the {change.obj.slot}" if change.twin else change.obj.name
        fields.update(before=named if edit.kind in ("object", "remove") else edit.before, obj=named,
                      slot=change.obj.slot, slot_phrase=f"on the {change.obj.slot} side")
        if edit.kind in ("object", "add"):
            fields["after_a"] = _a(edit.after)
    elif edit.kind == "background":
        fields.update(bg=_BG[edit.after], bg_word=f"the {edit.after}" if edit.after != "grass" else "grass")
    elif edit.kind == "time":
        fields.update(time=_TIME[edit.after][0], time_word=_TIME[edit.after][1])
    elif edit.kind == "style":
        fields.update(style=_STYLE[edit.after][0], style_alt=_STYLE[edit.after][1])
    return _pick(TEMPLATES[change.kind], rng, **fields)


# Russian instructions are imperative, as Russian editing prompts are written, with the object in
# the accusative (замени кошку на собаку). A colour is said as "в красный цвет" (the masculine
# form agrees with цвет), so no adjective needs another case.
TEMPLATES_RU: dict[str, tuple[str, ...]] = {
    "object": ("замени {before} на {after}", "преврати {before} в {after}"),
    "colour": ("перекрась {obj} в {colour} цвет", "покрась {obj} в {colour} цвет"),
    "colour-natural": ("перекрась {obj} в естественные цвета", "сделай цвета естественными"),
    "background": ("перенеси сцену {direction}", "смени фон на {background}", "пусть действие происходит {place}"),
    "time": ("пусть будет {time}", "смени время суток на {time}"),
    "add": ("добавь {after} {slot}", "нарисуй {after} {slot}"),
    "remove": ("убери {before}", "удали {before}"),
}
_DIRECTION_RU = {"beach": "на пляж", "grass": "на траву", "snow": "на снег", "city": "в город", "sky": "в небо",
                 "desert": "в пустыню"}
_BACKGROUND_ACC_RU = {"beach": "пляж", "grass": "лужайку", "snow": "снежное поле", "city": "город", "sky": "небо",
                      "desert": "пустыню"}
_TIME_RU = {"day": "день", "sunset": "закат", "night": "ночь"}
_STYLE_RU = {"photo": ("преврати в фотографию", "сделай фотореалистичным"),
             "sketch": ("преврати в набросок карандашом", "нарисуй карандашом"),
             "pixel-art": ("преврати в пиксель-арт", "сделай в стиле пиксель-арт"),
             "inverted": ("инвертируй цвета", "сделай негатив")}


def instruction_ru(edit: Edit, rng: np.random.Generator) -> str:
    change = change_of(edit)
    fields: dict[str, str] = {}
    if change.obj is not None:
        named = OBJECTS_RU[change.obj.name].acc + (f" {SLOTS_RU[change.obj.slot]}" if change.twin else "")
        fields.update(obj=named, before=named, slot=SLOTS_RU[change.obj.slot])
        if edit.kind in ("object", "add"):
            fields["after"] = OBJECTS_RU[edit.after].acc
        if edit.kind == "colour" and edit.after != "natural":
            fields["colour"] = COLOURS_RU[edit.after].m
    elif edit.kind == "background":
        fields.update(direction=_DIRECTION_RU[edit.after], background=_BACKGROUND_ACC_RU[edit.after],
                      place=BACKGROUNDS_RU[edit.after].place)
    elif edit.kind == "time":
        fields["time"] = _TIME_RU[edit.after]
    elif edit.kind == "style":
        return _pick(_STYLE_RU[edit.after], rng)
    return _pick(TEMPLATES_RU[change.kind], rng, **fields)


INSTRUCTION_WRITERS: dict[Language, Callable[[Edit, np.random.Generator], str]] = {"en": instruction, "ru": instruction_ru}


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
        try:
            language = detect_language(c.text)
        except LanguageError as err:
            return Rejected(c.id, c.text, "language", str(err))
        write_instruction, write_caption = INSTRUCTION_WRITERS[language], CAPTION_WRITERS[language][1]
        scene = Scene.from_dict(c.scene)
        rng = item_rng(self.seed, "edit", c.id)
        # Kinds in a seeded order; a scene that cannot take one (adding a third object) takes the next.
        kinds = self.kinds if kinds is None else tuple(kinds)
        for kind in [kinds[k] for k in rng.permutation(len(kinds))]:
            try:
                e = apply_edit(scene, kind, rng)
            except EditNotApplicable:
                continue
            return CaptionEdit(c.id, c.text, write_instruction(e, rng), write_caption(e.target, c.phrasing), e.kind,
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
