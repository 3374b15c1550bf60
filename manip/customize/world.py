"""EmojiWorld concepts for customization runs, with ground truth no public benchmark has.

The reserved objects and style never appear in base training. For each, the references are a
few renders (the object plain, in the centre, on varied backgrounds; the style on varied base
objects), and the evaluation prompts put the concept in novel scenes whose exact renders exist:
the "Real" ceiling row and the KID reference. Class prompts name the concept's class noun in
scenes of their own: DreamBooth's prior captions, Custom Diffusion's regularisation set (as real
renders) and the language-drift probe.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from manip.multilingual.russian import OBJECTS_RU, STYLES_RU
from manip.world import Placed, Renderer, Scene, caption
from manip.world.vocab import BACKGROUNDS, BASE_OBJECTS, RESERVED_OBJECTS, RESERVED_STYLES, SLOTS, STYLES, TIMES

from .concept import Concept

# The base-model word each concept refines: DreamBooth's class, the initial embedding of learnt tokens.
CLASS_NOUNS = {"teapot": "crown", "robot": "car", "cactus": "tree", "penguin": "owl", "mosaic": "pencil sketch"}
# Rare single BPE tokens the captions never use: one per concept, so concepts can train together.
IDENTIFIERS = ("sks", "ohwx", "phol", "hta", "olis")
WORLD_CONCEPTS = (*RESERVED_OBJECTS, *RESERVED_STYLES)
_STYLE_CLASS = {"mosaic": "sketch"}


@dataclass(frozen=True)
class PromptCase:
    """A prompt template (`{}` where each concept phrase goes) and the scene a perfect sample shows."""

    template: str
    scene: Scene


@dataclass(frozen=True)
class WorldConcept:
    concept: Concept
    cases: tuple[PromptCase, ...]  # the concept in novel scenes
    class_cases: tuple[PromptCase, ...]  # the class noun in scenes (templates hold no slot)


def _rng(seed: int, concept: str, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, WORLD_CONCEPTS.index(concept), purpose])


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def concept_template(scene: Scene, name: str) -> str:
    """The scene's canonical caption with the concept's words replaced by `{}`."""
    text = caption(scene)
    words = f"a {name} of" if name in RESERVED_STYLES else f"a {name}"
    slot = "a {} of" if name in RESERVED_STYLES else "a {}"
    if text.count(words) != 1:
        raise ValueError(f"caption {text!r} must name {name!r} exactly once")
    return text.replace(words, slot)


def _scene(rng: np.random.Generator, objects: list[tuple[str, str]], style: str,
           background: str | None = None) -> Scene:
    return Scene(background=background or _pick(rng, BACKGROUNDS), time=_pick(rng, TIMES), style=style,
                 objects=tuple(Placed(name=n, colour="natural", slot=s) for n, s in objects))


def world_concept(name: str, renderer: Renderer, n_references: int, n_prompts: int, seed: int) -> WorldConcept:
    if name not in WORLD_CONCEPTS:
        raise ValueError(f"unknown EmojiWorld concept {name!r}; known: {WORLD_CONCEPTS}")
    style = name in RESERVED_STYLES
    refs_rng, eval_rng, class_rng = (_rng(seed, name, k) for k in range(3))
    order = refs_rng.permutation(len(BACKGROUNDS))
    backgrounds = [BACKGROUNDS[order[i % len(order)]] for i in range(n_references)]
    if style:
        references = [_scene(refs_rng, [(_pick(refs_rng, BASE_OBJECTS), "center")], name, backgrounds[i])
                      for i in range(n_references)]
        cases = [_scene(eval_rng, [(_pick(eval_rng, BASE_OBJECTS), _pick(eval_rng, SLOTS))], name)
                 for _ in range(n_prompts)]
        class_scenes = [_scene(class_rng, [(_pick(class_rng, BASE_OBJECTS), _pick(class_rng, SLOTS))],
                               _STYLE_CLASS[name]) for _ in range(n_prompts)]
    else:
        references = [_scene(refs_rng, [(name, "center")], "photo", backgrounds[i]) for i in range(n_references)]
        cases = [_scene(eval_rng, [(name, _pick(eval_rng, SLOTS))], _pick(eval_rng, STYLES)) for _ in range(n_prompts)]
        class_scenes = [_scene(class_rng, [(CLASS_NOUNS[name], _pick(class_rng, SLOTS))], _pick(class_rng, STYLES))
                        for _ in range(n_prompts)]
    index = WORLD_CONCEPTS.index(name)
    concept = Concept(
        name=name, images=np.stack([renderer.render_array(s) for s in references]),
        templates=tuple(concept_template(s, name) for s in references), class_noun=CLASS_NOUNS[name],
        placeholder=f"<{name}>", identifier=IDENTIFIERS[index], kind="style" if style else "object",
        class_noun_ru=STYLES_RU[_STYLE_CLASS[name]] if style else OBJECTS_RU[CLASS_NOUNS[name]].word)
    return WorldConcept(concept=concept, cases=tuple(PromptCase(concept_template(s, name), s) for s in cases),
                        class_cases=tuple(PromptCase(caption(s), s) for s in class_scenes))


def pair_cases(first: str, second: str, n_prompts: int, seed: int) -> list[PromptCase]:
    """Two reserved objects side by side in novel scenes: the multi-concept probe."""
    for name in (first, second):
        if name not in RESERVED_OBJECTS:
            raise ValueError(f"multi-concept prompts take reserved objects, got {name!r}")
    rng = np.random.default_rng([seed, 99, WORLD_CONCEPTS.index(first), WORLD_CONCEPTS.index(second)])
    cases = []
    for _ in range(n_prompts):
        scene = _scene(rng, [(first, "left"), (second, "right")], _pick(rng, STYLES))
        template = caption(scene).replace(f"a {first}", "a {}", 1).replace(f"a {second}", "a {}", 1)
        cases.append(PromptCase(template, scene))
    return cases
