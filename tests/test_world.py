"""EmojiWorld: determinism, split hygiene, captions, edits with exact ground truth."""
from __future__ import annotations

import hashlib
import re
from dataclasses import replace

import numpy as np
import pytest

from manip.world import (
    EDIT_KINDS, EditNotApplicable, Placed, Renderer, Scene, SPLITS, all_captions, apply_edit, held_out_background,
    render_edit, resample_layout, sample_scene, scene_rng,
)
from manip.world.dataset import load_split
from manip.world.vocab import BACKGROUNDS, BASE_OBJECTS, OBJECTS, RESERVED_OBJECTS, RESERVED_STYLES, TIMES

N_SAMPLED = 400  # scenes drawn (not rendered) per split for distribution checks


def sampled(split: str, seed: int = 0, n: int = N_SAMPLED) -> list[Scene]:
    return [sample_scene(scene_rng(seed, split, i), split) for i in range(n)]


def has_held_out_pair(scene: Scene) -> bool:
    return any(o.name in BASE_OBJECTS and held_out_background(o.name) == scene.background for o in scene.objects)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("split", SPLITS)
def test_same_seed_split_index_gives_same_scene_and_bytes(artwork, split):
    for i in (0, 7, 123):
        a = sample_scene(scene_rng(5, split, i), split)
        b = sample_scene(scene_rng(5, split, i), split)
        assert a == b
        # Two independent renderers: no shared sprite cache between the two images.
        img_a = Renderer(artwork, 64).render_array(a)
        img_b = Renderer(artwork, 64).render_array(b)
        assert img_a.dtype == np.uint8 and img_a.shape == (64, 64, 3)
        assert img_a.tobytes() == img_b.tobytes()


def test_different_seeds_give_different_scenes_and_images(renderer):
    seed0 = [sample_scene(scene_rng(0, "train", i), "train") for i in range(10)]
    seed1 = [sample_scene(scene_rng(1, "train", i), "train") for i in range(10)]
    assert sum(a != b for a, b in zip(seed0, seed1)) >= 9
    images0 = [renderer.render_array(s).tobytes() for s in seed0[:3]]
    images1 = [renderer.render_array(s).tobytes() for s in seed1[:3]]
    assert all(a != b for a, b in zip(images0, images1))
    # Other indices (and other splits) under one seed differ too.
    assert len({s.to_json() for s in seed0}) >= 9
    assert sample_scene(scene_rng(0, "val", 0), "val") != seed0[0]


def test_build_twice_is_byte_identical(tiny_params, tiny_world, tmp_path):
    from stages.world import build

    other = tmp_path / "data" / "world"
    build(tiny_params, other)
    for split in SPLITS:
        for name in ("images.npy", "scenes.jsonl"):
            a, b = (tiny_world / split / name).read_bytes(), (other / split / name).read_bytes()
            assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), f"{split}/{name} differs"
    # No staging directories left beside the output.
    assert sorted(p.name for p in other.parent.iterdir()) == ["world"]


def test_built_world_matches_direct_render(tiny_params, tiny_world, renderer):
    for split in SPLITS:
        data = load_split(tiny_world / split)
        n = getattr(tiny_params.world, f"n_{split}")
        assert data.images.shape == (n, 64, 64, 3) and data.images.dtype == np.uint8
        assert len(data.scenes) == len(data.captions) == n
        assert (tiny_world / split / "preview.png").is_file()
        for i in (0, n - 1):
            scene = sample_scene(scene_rng(tiny_params.seed, split, i), split)
            assert data.scenes[i] == scene
            assert data.captions[i] == all_captions(scene)
            np.testing.assert_array_equal(np.asarray(data.images[i]), renderer.render_array(scene))


def test_preview_of_split_smaller_than_a_row():
    from stages.world import preview

    assert preview(np.zeros((3, 64, 64, 3), np.uint8)).size == (3 * 64, 64)
    assert preview(np.zeros((20, 64, 64, 3), np.uint8)).size == (8 * 64, 2 * 64)


# ---------------------------------------------------------------- splits


def test_test_split_uses_only_held_out_pairs(tiny_world):
    test_scenes = sampled("test") + load_split(tiny_world / "test").scenes
    assert all(has_held_out_pair(s) for s in test_scenes)
    for split in ("train", "val"):
        scenes = sampled(split) + load_split(tiny_world / split).scenes
        bad = [s for s in scenes if has_held_out_pair(s)]
        assert not bad, f"{split} shows a held-out pair: {bad[0]}"


def test_held_out_background_covers_every_background():
    assert {held_out_background(o) for o in BASE_OBJECTS} == set(BACKGROUNDS)
    with pytest.raises(ValueError):
        held_out_background("teapot")  # reserved objects have no held-out pair


def test_reserved_objects_only_in_concepts(tiny_world):
    reserved = set(RESERVED_OBJECTS)
    for split in ("train", "val", "test"):
        scenes = sampled(split) + load_split(tiny_world / split).scenes
        assert not {o.name for s in scenes for o in s.objects} & reserved, split
        assert not {s.style for s in scenes} & set(RESERVED_STYLES), split
    concepts = sampled("concepts") + load_split(tiny_world / "concepts").scenes
    seen = {o.name for s in concepts for o in s.objects}
    assert reserved <= seen
    assert all(any(o.name in reserved for o in s.objects) for s in concepts)


def test_at_least_40_base_objects_with_distinct_artwork(artwork):
    assert len(BASE_OBJECTS) >= 40
    assert len(set(BASE_OBJECTS)) == len(BASE_OBJECTS)
    assert set(BASE_OBJECTS) | set(RESERVED_OBJECTS) == set(OBJECTS)
    digests = {hashlib.sha256(artwork.sprite(o).tobytes()).hexdigest() for o in OBJECTS}
    assert len(digests) == len(OBJECTS), "two objects share the same sprite"


# ---------------------------------------------------------------- captions

TIME_WORDS = {"day": ("day", "sunny"), "sunset": ("sunset",), "night": ("night",)}


def word_in(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


def test_resample_layout_keeps_every_caption_and_moves_objects(renderer):
    scene = sample_scene(scene_rng(0, "train", 7), "train")
    other = resample_layout(scene, np.random.default_rng(1))
    assert all_captions(other) == all_captions(scene)
    assert [(o.name, o.colour, o.slot) for o in other.objects] == [(o.name, o.colour, o.slot) for o in scene.objects]
    assert [(o.dx, o.dy, o.scale) for o in other.objects] != [(o.dx, o.dy, o.scale) for o in scene.objects]
    assert not np.array_equal(renderer.render_array(other), renderer.render_array(scene))
    assert resample_layout(scene, np.random.default_rng(1)) == other


@pytest.mark.parametrize("split", SPLITS)
def test_captions_mention_object_background_and_time(split):
    for scene in sampled(split, n=60):
        captions = all_captions(scene)
        assert len(set(captions)) == len(captions), "phrasings collapse"
        for text in captions:
            for obj in scene.objects:
                assert word_in(obj.name, text), (obj.name, text)
                if obj.colour != "natural":
                    assert word_in(obj.colour, text), (obj.colour, text)
            assert word_in(scene.background, text), (scene.background, text)
            assert any(word_in(w, text) for w in TIME_WORDS[scene.time]), (scene.time, text)
            others = [w for t in TIMES if t != scene.time for w in TIME_WORDS[t]]
            assert not any(word_in(w, text) for w in others), (scene.time, text)


# ---------------------------------------------------------------- edits

ONE = Scene("grass", "day", "photo", (Placed("cat", "natural", "left"),))
TWO = Scene("beach", "sunset", "photo", (Placed("dog", "red", "left"), Placed("apple", "natural", "right")))


def base_scene_for(kind: str) -> list[Scene]:
    if kind == "add":
        return [ONE, replace(ONE, objects=(Placed("cat", "natural", "right"),))]
    if kind == "remove":
        return [TWO]
    return [ONE, TWO]


def check_changed_only(kind: str, src: Scene, tgt: Scene, before: str, after: str) -> None:
    scene_fields = {"background", "time", "style"}
    if kind in scene_fields:
        assert getattr(src, kind) == before and getattr(tgt, kind) == after and before != after
        assert tgt == replace(src, **{kind: after})
        return
    for f in scene_fields:
        assert getattr(src, f) == getattr(tgt, f), f
    if kind in ("object", "colour"):
        attr = "name" if kind == "object" else "colour"
        assert len(src.objects) == len(tgt.objects)
        changed = [(a, b) for a, b in zip(src.objects, tgt.objects) if a != b]
        assert len(changed) == 1
        a, b = changed[0]
        assert getattr(a, attr) == before and getattr(b, attr) == after and before != after
        assert b == replace(a, **{attr: after})
    elif kind == "add":
        assert len(src.objects) == 1 and len(tgt.objects) == 2
        assert tgt.objects[0] == src.objects[0]
        added = tgt.objects[1]
        assert added.name == after and before == ""
        assert {added.slot, src.objects[0].slot} == {"left", "right"}
    elif kind == "remove":
        assert len(src.objects) == 2 and len(tgt.objects) == 1
        assert tgt.objects[0] in src.objects
        removed = [o for o in src.objects if o != tgt.objects[0]]
        assert [o.name for o in removed] == [before] and after == ""
    else:  # pragma: no cover
        raise AssertionError(f"untested edit kind {kind}")


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edit_changes_exactly_the_intended_attribute(renderer, kind):
    for scene in base_scene_for(kind):
        for seed in range(3):
            edit = apply_edit(scene, kind, np.random.default_rng(seed))
            assert edit.kind == kind and edit.source == scene
            check_changed_only(kind, edit.source, edit.target, edit.before, edit.after)
            src, tgt, mask = render_edit(renderer, edit)
            assert mask.shape == (64, 64) and mask.dtype == bool
            assert mask.any(), f"{kind} edit left the image unchanged"
            changed = np.any(src != tgt, axis=-1)
            assert changed.any()
            assert not (changed & ~mask).any(), "mask misses changed pixels"
            np.testing.assert_array_equal(src, renderer.render_array(scene))
            np.testing.assert_array_equal(tgt, renderer.render_array(edit.target))
            if kind in ("object", "colour", "add", "remove"):
                assert mask.mean() < 0.6, f"{kind} edit should be local, mask covers {mask.mean():.0%}"


def test_edit_not_applicable():
    rng = np.random.default_rng(0)
    with pytest.raises(EditNotApplicable):
        apply_edit(TWO, "add", rng)
    with pytest.raises(EditNotApplicable):
        apply_edit(ONE, "remove", rng)
    with pytest.raises(EditNotApplicable):
        apply_edit(replace(ONE, objects=(Placed("cat", "natural", "center"),)), "add", rng)
    with pytest.raises(ValueError, match="teleport"):
        apply_edit(ONE, "teleport", rng)


@pytest.mark.parametrize(
    "make, bad",
    [
        (lambda: Scene("moon", "day", "photo", ONE.objects), "moon"),
        (lambda: Scene("grass", "noon", "photo", ONE.objects), "noon"),
        (lambda: Scene("grass", "day", "oil-painting", ONE.objects), "oil-painting"),
        (lambda: Placed("unicorn", "natural", "left"), "unicorn"),
        (lambda: Placed("cat", "pink", "left"), "pink"),
        (lambda: Placed("cat", "natural", "top"), "top"),
        (lambda: Scene("grass", "day", "photo", ()), "0"),
        (lambda: Scene("grass", "day", "photo", ONE.objects * 3), "3"),
        (lambda: Scene("grass", "day", "photo", (Placed("cat", "red", "left"), Placed("dog", "red", "center"))),
         "center"),
    ],
)
def test_scene_validation_names_bad_value(make, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        make()


def test_scene_dict_round_trip():
    for scene in sampled("train", n=20) + [ONE, TWO]:
        assert Scene.from_dict(scene.to_dict()) == scene
