"""EmojiWorld captions in both languages: how each language writes a scene, and a bilingual
corpus over every split, reserved concepts and style included (the `multilingual` stage trains
its tokenizer on the train split alone)."""
from __future__ import annotations

from collections.abc import Callable

from manip.world import SPLITS, Scene, all_captions, sample_scene, scene_rng
from manip.world.captions import N_PHRASINGS, caption

from .language import Language
from .russian import N_PHRASINGS_RU, all_captions_ru, caption_ru

# Per caption language: its number of phrasings and the function writing phrasing k of a scene.
CAPTION_WRITERS: dict[Language, tuple[int, Callable[[Scene, int], str]]] = {
    "en": (N_PHRASINGS, caption), "ru": (N_PHRASINGS_RU, caption_ru),
}


def all_captions_in(scene: Scene, language: Language) -> list[str]:
    """Every phrasing of the scene's caption in `language`."""
    return all_captions(scene) if language == "en" else all_captions_ru(scene)


def bilingual_captions(seed: int, n_per_split: int) -> list[str]:
    """Every English and Russian phrasing of the first scenes of each split. All splits take
    part: the reserved concepts and style occur only in `concepts`, and a tokenizer sees text
    alone, so test captions reveal no image."""
    texts: list[str] = []
    for split in SPLITS:
        for index in range(n_per_split):
            scene = sample_scene(scene_rng(seed, split, index), split)
            texts += all_captions(scene) + all_captions_ru(scene)
    return texts
