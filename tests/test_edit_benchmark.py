"""EmojiWorld-Edit: case construction, the numpy image-quality metrics, and the
`edit_benchmark` stage end to end on a tiny random pipeline and a tiny world (outputs, resume)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import manip.editing.benchmark as bm
from manip.editing.benchmark import KINDS, BenchmarkSettings, build_cases, differing_words
from manip.editing.scoring import JUDGE_HITS
from manip.metrics.image_quality import mse, psnr, ssim, ssim_map
from manip.world import EditNotApplicable, apply_edit, caption
from manip.world.dataset import load_split
from tiny_pipeline import save_tiny_clip_and_judge, saved_tiny_pipeline

from conftest import tiny_params_dict

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- image quality


def noisy(img: np.ndarray, amount: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(int) + rng.integers(-amount, amount + 1, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    yy, xx = np.mgrid[0:48, 0:40]
    img = np.stack([xx * 6, yy * 5, (xx * yy) % 256], -1).astype(np.uint8)
    img[10:30, 8:20] = (250, 30, 30)
    return img


def test_ssim_matches_scipy_reference(picture):
    from scipy.ndimage import correlate

    other = noisy(picture, 30)
    x, y = picture.astype(np.float64), other.astype(np.float64)
    w1 = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w2 = np.outer(w1, w1) / np.outer(w1, w1).sum()  # the 11 x 11 Gaussian window, sigma 1.5
    ref = []
    for c in range(3):
        f = lambda z: correlate(z, w2, mode="mirror")  # noqa: E731
        mx, my = f(x[..., c]), f(y[..., c])
        vx, vy, cxy = f(x[..., c] ** 2) - mx**2, f(y[..., c] ** 2) - my**2, f(x[..., c] * y[..., c]) - mx * my
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        ref.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    np.testing.assert_allclose(ssim_map(picture, other), np.mean(ref, 0), atol=1e-10)


def test_ssim_psnr_mse_properties(picture):
    assert ssim(picture, picture) == pytest.approx(1.0)
    assert psnr(picture, picture) == 100.0 and mse(picture, picture) == 0.0
    a, b = noisy(picture, 10), noisy(picture, 40, seed=1)
    assert 0 < ssim(picture, b) < ssim(picture, a) < 1
    assert psnr(picture, b) < psnr(picture, a)
    assert ssim(picture, a) == pytest.approx(ssim(a, picture))
    assert ssim(picture[..., 0], a[..., 0]) > 0  # greyscale works too
    # Masks: only the masked pixels count; an empty mask is undefined, not zero.
    mask = np.zeros(picture.shape[:2], bool)
    mask[:, :20] = True
    half = picture.copy()
    half[:, 20:] = 0
    assert mse(picture, half, mask) == 0.0 and psnr(picture, half, mask) == 100.0
    assert mse(picture, half, ~mask) > 0 and ssim(picture, half, ~mask) < ssim(picture, half, mask)
    diff = (picture.astype(float) - half.astype(float)) ** 2
    assert mse(picture, half, ~mask) == pytest.approx(diff[:, 20:].mean())
    assert np.isnan(psnr(picture, half, np.zeros_like(mask))) and np.isnan(ssim(picture, half, np.zeros_like(mask)))
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(picture, picture[:10])
    with pytest.raises(ValueError, match="mask shape"):
        psnr(picture, picture, mask[:10])


# ---------------------------------------------------------------- cases


@pytest.fixture(scope="module")
def test_scenes(tiny_world):
    return load_split(tiny_world / "test").scenes


def test_cases_are_balanced_deterministic_and_extendable(test_scenes):
    cases = build_cases(test_scenes, seed=3, n_cases=12)
    assert len(cases) == 12
    assert Counter(c.kind for c in cases) == {k: 2 for k in KINDS}
    assert [c.kind for c in cases[:6]] == list(KINDS)
    assert len({(c.kind, c.index) for c in cases}) == 12
    assert [c.to_dict() for c in build_cases(test_scenes, 3, 12)] == [c.to_dict() for c in cases]
    assert [c.to_dict() for c in build_cases(test_scenes, 3, 6)] == [c.to_dict() for c in cases[:6]]
    assert [c.to_dict() for c in build_cases(test_scenes, 4, 12)] != [c.to_dict() for c in cases]
    for c in cases:
        assert c.source == test_scenes[c.index]
        assert c.source_caption == caption(c.source, 0) and c.target_caption == caption(c.target, 0)
        assert c.source_caption != c.target_caption
        n_src, n_tgt = len(c.source_caption.split()), len(c.target_caption.split())
        assert c.mode == ("replace" if n_src == n_tgt else "refine")
        if c.kind == "add":
            assert len(c.source.objects) == 1 and len(c.target.objects) == 2
    assert {c.mode for c in cases} == {"replace", "refine"}


def test_cases_skip_scenes_an_edit_does_not_apply_to(test_scenes):
    not_addable = []
    for s in test_scenes:
        try:
            apply_edit(s, "add", np.random.default_rng(0))
        except EditNotApplicable:
            not_addable.append(s)
    assert not_addable, "the tiny test split should hold a scene that cannot take an added object"
    cases = build_cases(test_scenes, 3, 60)
    assert all(len(c.source.objects) == 1 and c.source.objects[0].slot != "center" for c in cases if c.kind == "add")
    assert len(cases) == 60  # other kinds fill in for the few addable scenes


def test_differing_words():
    assert differing_words("a cat on the left, on the beach",
                           "an apple on the left, on the beach") == (["cat"], ["apple"])
    assert differing_words("a cat on the left, at night", "a red cat on the left, at night") == ([], ["red"])
    src, tgt = differing_words("a cat on the left, on the grass during the day",
                               "a cat on the left and a dog on the right, on the grass during the day")
    assert src == [] and tgt == ["dog", "right"]  # "left," vs "left": punctuation is not a change
    assert differing_words("a photo of a cat", "a pencil sketch of a cat") == (["photo"], ["pencil", "sketch"])
    settings = BenchmarkSettings(local_blend=False)
    case = build_cases([apply_edit_scene()], 0, 1, kinds=("colour",))[0]
    assert settings.p2p(case).blend_words is None
    assert BenchmarkSettings().p2p(case).blend_words is not None


def apply_edit_scene():
    from manip.world import Placed, Scene

    return Scene("grass", "day", "photo", (Placed("cat", "red", "left"),))


@pytest.mark.parametrize("added, other", [("dog", "pizza"), ("guitar", "whale"), ("rocket", "apple")])
def test_adding_an_object_succeeds_only_with_that_object(renderer, added, other):
    """Read by the shipped judge: the ground truth of an add edit succeeds; the unedited input,
    and the right slot filled with another object, do not."""
    from manip.editing.scoring import EditScorer
    from manip.metrics.clip_scores import ClipScorer
    from manip.metrics.judge import AttributeJudge
    from manip.world import Placed
    from manip.world.edits import Edit, render_edit

    source = apply_edit_scene()
    kept = source.objects[0]
    target = source.with_(objects=(kept, Placed(added, "natural", "right")))
    wrong = source.with_(objects=(kept, Placed(other, "natural", "right")))
    edit = Edit("add", "", added, source, target)
    judge = AttributeJudge.from_pretrained(ROOT / "models/judge")
    score = EditScorer(renderer, ClipScorer(ROOT / "models/clip"), judge)
    src, truth, _ = render_edit(renderer, edit)
    mistaken = render_edit(renderer, Edit("add", "", other, source, wrong))[1]
    caption_ = caption(target, 0)
    right = score(edit, caption_, None, truth)
    assert right["success"] == 1.0 and np.isnan(right["recon_psnr"])  # no reconstruction given, none scored
    assert score(edit, caption_, None, src)["success"] == 0.0
    assert score(edit, caption_, None, mistaken)["success"] == 0.0


# ---------------------------------------------------------------- the stage, end to end


@pytest.fixture
def bench_dir(tmp_path, tiny_world) -> Path:
    """A project-shaped folder: params.yaml, data/world (the tiny world), models/{base,clip,judge}."""
    params = tiny_params_dict()
    params["edit_benchmark"] = {"n_cases": 6, "steps": 3, "null_text_inner_steps": 2, "limit_per_run": 10,
                                "batch_size": 4}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "world").symlink_to(tiny_world, target_is_directory=True)
    saved_tiny_pipeline(tmp_path / "models" / "base", "epsilon", smooth=True, image_size=64)
    save_tiny_clip_and_judge(tmp_path / "models")
    return tmp_path


def read_csv(path: str) -> list[dict]:
    return list(csv.DictReader(Path(path).read_text().splitlines()))


def shard_times(work: Path) -> dict[str, int]:
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in sorted(work.rglob("*")) if p.is_file()}


def test_stage_end_to_end_and_resume(bench_dir, monkeypatch):
    from stages.edit_benchmark import run
    from stages.params import load_params

    monkeypatch.chdir(bench_dir)
    calls, batches = Counter(), []
    real_invert = bm.invert_batch

    def counting_invert(pipe, images, prompts, method, **kw):
        calls[method] += len(images)
        batches.append(len(images))
        return real_invert(pipe, images, prompts, method, **kw)

    monkeypatch.setattr(bm, "invert_batch", counting_invert)
    params = load_params("params.yaml")
    bench = params.edit_benchmark
    assert bench.n_cases == 6 and bench.inversions == ["ddim", "null-text", "negative-prompt", "direct"]
    methods, pairs = bench.inversions, 6 * 4

    def with_bench(b):
        return params.model_copy(update={"edit_benchmark": b})

    # First run stops after `limit_per_run` shards, and still reports what is done; cases go
    # through in batches of `batch_size` per method.
    first = run(params, progress=False)
    assert sum(calls.values()) == 10 and batches == [4, 2, 4]
    assert first["complete"] is False and first["shards"] == {"done": 10, "remaining": 14}
    assert len(read_csv("plots/edit_benchmark_cases.csv")) == 10

    # Second run picks up the rest; each (method, case) was inverted exactly once overall.
    full = bench.model_copy(update={"limit_per_run": None})
    metrics = run(with_bench(full), progress=False)
    assert calls == {m: 6 for m in methods}
    assert metrics["complete"] is True and metrics["shards"] == {"done": pairs, "remaining": 0}
    assert sum(calls.values()) == pairs
    assert metrics["n_cases"] == 6 and metrics["n_cases_by_kind"] == {k: 1 for k in KINDS}

    # Outputs.
    on_disk = json.loads(Path("metrics/edit_benchmark.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert set(on_disk["inversions"]) == set(methods)
    for m in methods:
        agg = on_disk["inversions"][m]
        assert agg["overall"]["n"] == 6 and set(agg["by_kind"]) == set(KINDS)
        assert all(v["n"] == 1 for v in agg["by_kind"].values())
        for key in ("recon_psnr", "recon_ssim", "clip_t", "structure_dist", "success", "invert_seconds",
                    "edit_seconds", "gt_psnr_in"):
            assert isinstance(agg["overall"][key], float), (m, key)
        assert 0 <= agg["overall"]["success"] <= 1 and -1 <= agg["overall"]["clip_t"] <= 1

    rows = read_csv("plots/edit_benchmark_cases.csv")
    assert len(rows) == pairs
    case_ids = {r["case_id"] for r in rows}
    assert len(case_ids) == 6
    assert {(r["method"], r["case_id"]) for r in rows} == {(m, c) for m in methods for c in case_ids}
    assert set(rows[0]) >= {"kind", "mode", "source_caption", "target_caption", "bg_ssim", "clip_t_region", "success"}
    assert {r["kind"] for r in rows} == set(KINDS)
    background = [r for r in rows if r["kind"] in ("object", "colour", "add")]
    assert all(r["bg_psnr"] not in ("", None) for r in background)  # local edits leave a background

    grid = Image.open("plots/edit_grid.png")
    assert grid.size == ((2 + len(methods)) * 64 * 3, len(KINDS) * 64 * 3)

    shards = Path("data/edit_benchmark")
    assert sorted(p.name for p in shards.iterdir()) == sorted(methods)
    assert len(list(shards.rglob("*.json"))) == pairs and len(list(shards.rglob("*.png"))) == pairs
    assert not [p for p in shards.rglob(".*")]  # no temporary files left behind
    record = json.loads(next((shards / "ddim").glob("*.json")).read_text())
    assert {"fingerprint", "method", "case", "p2p", "notes", "metrics"} <= set(record)

    # Third run: nothing to do, nothing rewritten, same reports.
    before, csv_before = shard_times(shards), Path("plots/edit_benchmark_cases.csv").read_bytes()
    again = run(with_bench(full), progress=False)
    assert calls == {m: 6 for m in methods}
    assert shard_times(shards) == before
    assert Path("plots/edit_benchmark_cases.csv").read_bytes() == csv_before
    assert again["inversions"] == metrics["inversions"]

    # Another way of scoring rescores the stored edits and computes none of them again: with no
    # reading required (all() of nothing) every style edit succeeds, the other kinds keep theirs;
    # with a judge that reads nothing right, no edit succeeds.
    with monkeypatch.context() as patched:
        patched.setitem(JUDGE_HITS, "style", ())
        rescored = run(with_bench(full), progress=False)
    for m in methods:
        now, then = rescored["inversions"][m]["by_kind"], metrics["inversions"][m]["by_kind"]
        assert now["style"]["success"] == 1.0
        assert {k: now[k] for k in KINDS if k != "style"} == {k: then[k] for k in KINDS if k != "style"}
    monkeypatch.setattr("manip.editing.scoring.attribute_hits",
                        lambda pred, scenes: {k: np.zeros(len(scenes), bool) for k in judged_attributes()})
    blind = run(with_bench(full), progress=False)
    assert all(blind["inversions"][m]["overall"]["success"] == 0.0 for m in methods)
    assert all(blind["inversions"][m]["overall"]["clip_t"] == metrics["inversions"][m]["overall"]["clip_t"]
               for m in methods)
    assert calls == {m: 6 for m in methods} and shard_times(shards) == before

    # A changed setting invalidates the shards it affects (all of them here), nothing else.
    changed = full.model_copy(update={"blend_threshold": 0.5, "limit_per_run": 1, "inversions": ["ddim"]})
    partial = run(with_bench(changed), progress=False)
    assert partial["shards"] == {"done": 1, "remaining": 5}
    assert calls["ddim"] == 7

    # So does other code: DVC reruns the stage when its code changes, and the rerun must redo the
    # shards instead of finding them done.
    monkeypatch.setattr("stages.edit_benchmark.code_digest", lambda *paths: "other code")
    recoded = run(with_bench(full.model_copy(update={"limit_per_run": 1, "inversions": ["ddim"]})), progress=False)
    assert recoded["shards"] == {"done": 1, "remaining": 5}
    assert calls["ddim"] == 8


def judged_attributes() -> set[str]:
    return {k for kinds in JUDGE_HITS.values() for k in kinds}


def test_stage_params_section(tmp_path):
    from stages.params import EditBenchmarkParams, ParamsError, load_params

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"seed": 1}))
    params = load_params(path)
    bench = params.edit_benchmark
    assert params.seed == 1 and bench == EditBenchmarkParams()
    assert bench.n_cases == 300 and bench.steps == 50 and bench.limit_per_run is None
    path.write_text(yaml.safe_dump({"seed": 1, "edit_benchmark": {"n_cases": 0, "inversions": ["ddim", "edict"],
                                                                   "cross_replace": 2, "bogus": 1}}))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    msg = str(err.value)
    for field in ("edit_benchmark.n_cases", "edit_benchmark.inversions", "edit_benchmark.cross_replace",
                  "edit_benchmark.bogus"):
        assert field in msg, msg
    path.write_text(yaml.safe_dump({"seed": -1, "edit_benchmark": {"inversions": ["ddim", "ddim"]}}))
    with pytest.raises(ParamsError, match=r"seed:(.|\n)*edit_benchmark.inversions: .*repeat"):
        load_params(path)


def test_stage_missing_inputs_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    env = dict(os.environ, MANIP_THREADS="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("MANIP_PARAMS", None)
    proc = subprocess.run([sys.executable, "-m", "stages.edit_benchmark"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: models/base/model_index.json is missing: build it with `dvc repro unet`")
