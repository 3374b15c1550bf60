"""The same EmojiWorld edits written in English and in Russian.

The rules backend draws an edit's kind and values from (seed, caption id) and only then writes
the instruction in the caption's language, so a scene captioned in both languages under one id
gets the same edit twice: one ground truth, two instructions. Those pairs teach the bilingual
text encoder to read a Russian instruction as the base encoder reads the English one
(stage `ip2p_multilingual`), and they let an evaluation compare the languages on identical
cases, scored against the same target render.
"""
from __future__ import annotations

from collections.abc import Sequence

from manip.world.scene import Scene

from .captions import world_captions
from .records import CaptionEdit
from .rules import RulesEditor


def parallel_edits(scenes: Sequence[Scene], seed: int, n: int, prefix: str,
                   balanced: bool = False) -> tuple[list[CaptionEdit], list[CaptionEdit]]:
    """English and Russian rules edits of the first `n` scenes, pair i being one edit (same id,
    same ground truth) in both languages; a scene no edit kind applies to gives none.
    `balanced` is `RulesEditor.edit_all`'s."""
    editor = RulesEditor(seed)
    sides = []
    for language in ("en", "ru"):
        edits, _ = editor.edit_all(world_captions(scenes, seed, n, prefix=prefix, language=language), balanced=balanced)
        sides.append(edits)
    english, russian = sides
    if not english:
        raise ValueError(f"no edit of the first {n} of {len(scenes)} scenes: nothing to pair")
    if [e.id for e in english] != [e.id for e in russian]:
        raise RuntimeError("the rules backend edited different captions in English and in Russian")
    for en, ru in zip(english, russian):
        if en.truth != ru.truth or en.kind != ru.kind:
            raise RuntimeError(f"caption {en.id}: the English and Russian edits differ ({en.edit!r} vs {ru.edit!r})")
    return english, russian
