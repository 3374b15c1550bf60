"""Metrics: KID, the attribute judge's scoring and persistence, PSNR."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from manip.metrics.judge import EMPTY, AttributeJudge, attribute_hits, judge_loss, objects_in_place, predict, scene_targets
from manip.metrics.kid import kid
from manip.training.images import psnr, to_tensor
from manip.world import Placed, Scene, sample_scene, scene_rng
from manip.world.dataset import load_split

# ---------------------------------------------------------------- KID


def features(seed: int, n: int = 300, d: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def test_kid_same_distribution_near_zero_and_shift_larger():
    x, y = features(0), features(1)
    same_mean, same_std = kid(x, y, n_subsets=20, subset_size=100)
    self_mean, _ = kid(x, x, n_subsets=20, subset_size=100)
    shifted_mean, shifted_std = kid(x, y + 0.5, n_subsets=20, subset_size=100)
    far_mean, _ = kid(x, y + 1.0, n_subsets=20, subset_size=100)
    assert abs(same_mean) < 0.05 and same_std >= 0
    assert abs(self_mean) < 0.1
    assert shifted_mean > 0.5 and shifted_mean > 10 * abs(same_mean) + 5 * shifted_std
    assert far_mean > shifted_mean  # grows with the shift
    assert kid(x, 1.5 * y, n_subsets=20, subset_size=100)[0] > 0.1  # a change of spread is seen too


def test_kid_is_seeded_and_symmetric_in_expectation():
    x, y = features(0), features(1) + 0.3
    assert kid(x, y, n_subsets=5, subset_size=50, seed=4) == kid(x, y, n_subsets=5, subset_size=50, seed=4)
    assert kid(x, y, n_subsets=5, subset_size=50, seed=4) != kid(x, y, n_subsets=5, subset_size=50, seed=5)
    a, b = kid(x, y, n_subsets=20, subset_size=100)[0], kid(y, x, n_subsets=20, subset_size=100)[0]
    assert a == pytest.approx(b, rel=0.2)


# ---------------------------------------------------------------- attribute judge

SCENES = [
    Scene("grass", "day", "photo", (Placed("cat", "natural", "left"),)),
    Scene("beach", "sunset", "sketch", (Placed("dog", "red", "left"), Placed("apple", "blue", "right"))),
    Scene("snow", "night", "inverted", (Placed("teapot", "natural", "center"),)),
    Scene("city", "day", "mosaic", (Placed("rocket", "green", "left"), Placed("penguin", "natural", "right"))),
]


def perfect_predictions(scenes) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in scene_targets(scenes).items()}


def test_perfect_predictions_hit_everything():
    scenes = SCENES + [sample_scene(scene_rng(0, s, i), s) for s in ("train", "test", "concepts") for i in range(30)]
    hits = attribute_hits(perfect_predictions(scenes), scenes)
    assert set(hits) == {"background", "time", "style", "position", "object", "colour", "all"}
    for k, v in hits.items():
        assert v.shape == (len(scenes),) and v.dtype == bool, k
        assert v.all(), k


def test_each_wrong_attribute_is_caught():
    pred = perfect_predictions(SCENES)
    pred["background"][0] = (pred["background"][0] + 1) % 6
    pred["slot_object"][1] = pred["slot_object"][1][::-1]  # both objects present, slots swapped
    pred["slot_colour"][2, 0] = 3  # colour of an empty slot is not judged
    pred["slot_colour"][3, 0] = 0  # green rocket drawn natural
    hits = attribute_hits(pred, SCENES)
    assert hits["background"].tolist() == [False, True, True, True]
    assert hits["position"].tolist() == [True, True, True, True]  # occupied slots are right
    assert hits["object"].tolist() == [True, True, True, True]
    assert hits["colour"].tolist() == [True, True, True, False]
    assert hits["all"].tolist() == [False, False, True, False]
    assert objects_in_place(pred, SCENES).tolist() == [True, False, True, True]
    # The foundation's four attributes leave colour out: the green rocket drawn natural counts.
    from stages.evaluate_base import accuracy_table

    table = accuracy_table(pred, SCENES)
    assert table["core"] == 0.5 and table["all"] == 0.25

    moved = perfect_predictions(SCENES)
    moved["slot_object"][2] = np.roll(moved["slot_object"][2], 1)  # the single object drawn in another slot
    hits = attribute_hits(moved, SCENES)
    assert hits["position"].tolist() == [True, True, False, True]
    assert hits["object"].tolist() == [True, True, True, True]
    assert hits["all"].tolist() == [True, True, False, True]

    missing = perfect_predictions(SCENES)
    missing["slot_object"][1, 2] = EMPTY  # the apple is not drawn
    hits = attribute_hits(missing, SCENES)
    assert hits["object"].tolist() == [True, False, True, True]
    assert hits["position"].tolist() == [True, False, True, True]


def test_scene_targets_layout():
    t = scene_targets(SCENES)
    assert t["slot_object"].shape == (4, 3)
    assert t["slot_object"][0].tolist()[1:] == [EMPTY, EMPTY]
    assert t["slot_colour"][0].tolist()[1:] == [-100, -100]
    assert t["slot_object"][2, 0] == EMPTY and t["slot_object"][2, 1] != EMPTY


def test_judge_round_trip(tiny_world, tmp_path):
    images = np.asarray(load_split(tiny_world / "val").images[:8])
    torch.manual_seed(0)
    judge = AttributeJudge(width=8, image_size=64)
    # One optimisation step in train mode, so weights and BatchNorm statistics differ from init.
    opt = torch.optim.SGD(judge.parameters(), lr=0.1)
    scenes = load_split(tiny_world / "val").scenes[:8]
    judge.train()
    judge_loss(judge(to_tensor(images)), scene_targets(scenes)).backward()
    opt.step()
    judge.eval()
    with torch.no_grad():
        before = judge(to_tensor(images))

    judge.save_pretrained(tmp_path / "judge")
    assert (tmp_path / "judge" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = AttributeJudge.from_pretrained(tmp_path / "judge").eval()
    assert loaded.config.width == 8 and loaded.config.image_size == 64
    with torch.no_grad():
        after = loaded(to_tensor(images))
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    fresh = AttributeJudge(width=8, image_size=64).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(to_tensor(images))["background"], after["background"])

    pred = predict(loaded, images, batch=3)
    assert pred["slot_object"].shape == (8, 3) and pred["background"].shape == (8,)
    np.testing.assert_array_equal(pred["time"], after["time"].argmax(-1).numpy())


# ---------------------------------------------------------------- PSNR


def test_psnr():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    same = psnr(a, a.copy())
    assert same.shape == (3,) and (same > 100).all()

    noisy = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    p = psnr(a, noisy)
    assert np.isfinite(p).all() and (p > 15).all() and (p < 40).all()

    off_by_one = np.where(a < 255, a + 1, a - 1).astype(np.uint8)  # no uint8 wrap-around
    np.testing.assert_allclose(psnr(a, off_by_one), 10 * np.log10(255.0**2), rtol=1e-12)
    worse = np.clip(a.astype(int) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
    assert (psnr(a, worse) < p).all()
