"""A bilingual caption corpus over every split, reserved concepts and style included (the
`multilingual` stage trains its tokenizer on the train split alone)."""
from __future__ import annotations

from manip.world import SPLITS, all_captions, sample_scene, scene_rng

from .russian import all_captions_ru


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
