"""Paired synthesis with the CLIP filter in the loop, shards and the published dataset, on a tiny
random-weight pipeline and CLIP."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from manip.editing.edit import edit_generated, edit_generated_batch
from manip.editing.p2p import P2PConfig
from manip.ip2p.clip_filter import PROFILES, ClipThresholds
from manip.ip2p.dataset import filter_report, rows_from_shards, write_dataset
from manip.ip2p.pairs import Candidate, PairSettings, read_shard, run_shards, synthesize
from manip.ip2p.records import CaptionEdit
from manip.metrics.clip_scores import ClipScorer
from tiny_pipeline import save_tiny_clip_and_judge, tiny_pipeline

PASS_ALL = ClipThresholds(-2.0, -2.0, -2.0)
PASS_NONE = ClipThresholds(2.0, 2.0, 2.0)
EDITS = [
    CaptionEdit("e0", "a cat on the grass", "make it a dog", "a dog on the grass", "object"),
    CaptionEdit("e1", "a red apple in the snow", "add a key", "a red apple and a key in the snow", "add"),
    CaptionEdit("e2", "a car in the city", "make it night", "a car in the city at night", "time"),
]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("epsilon", smooth=True, image_size=64)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    save_tiny_clip_and_judge(models)
    return ClipScorer(models / "clip")


def settings(**kw) -> PairSettings:
    base = {"steps": 3, "n_samples": 5, "max_out_samples": 2, "batch_size": 4, "thresholds": PASS_ALL}
    return PairSettings(**{**base, **kw})


def test_per_group_guidance_batch_matches_one_at_a_time(pipe):
    groups = [["a cat on the grass", "a dog on the grass"], ["a car in the city", "a bus in the city"]]
    configs = [P2PConfig(self_replace=0.3), P2PConfig(self_replace=0.7)]
    batch = edit_generated_batch(pipe, groups, [torch.Generator().manual_seed(s) for s in (1, 2)], configs, 4,
                                 [7.5, 12.0])
    for g, (prompts, config, seed, cfg) in enumerate(zip(groups, configs, (1, 2), (7.5, 12.0))):
        alone = edit_generated(pipe, prompts, torch.Generator().manual_seed(seed), config, 4, cfg)
        assert np.abs(batch[g].astype(int) - alone.astype(int)).max() <= 1


def test_candidates_depend_only_on_seed_edit_and_index():
    s = settings(self_replace=(0.2, 0.4), guidance=(8.0, 9.0))
    a = Candidate.draw(0, EDITS[0], 3, s)
    assert a == Candidate.draw(0, EDITS[0], 3, s)
    assert 0.2 <= a.p <= 0.4 and 8.0 <= a.cfg <= 9.0
    assert len({Candidate.draw(seed, e, j, s).seed for seed in (0, 1) for e in EDITS for j in range(3)}) == 18
    assert a.config(s).edit == "replace" and Candidate.draw(0, EDITS[1], 0, s).config(s).edit == "refine"
    assert a.config(s).self_replace == a.p == a.config(s).cross_replace
    assert a.config(settings(cross_replace=0.8)).cross_replace == 0.8


def test_early_stop_draws_only_what_it_needs(pipe, scorer):
    result = synthesize(pipe, scorer, EDITS, 0, settings())
    assert len(result.tries) == 3 * 2 and len(result.kept) == 3 * 2
    assert result.pairs.shape == (6, 2, 64, 64, 3) and result.unet_images == 12
    for e in EDITS:  # best directional similarity first
        dirs = [k["clip_direction"] for k in result.kept if k["id"] == e.id]
        assert dirs == sorted(dirs, reverse=True)
    again = synthesize(pipe, scorer, EDITS, 0, settings())
    assert np.array_equal(result.pairs, again.pairs) and result.tries == again.tries


def test_original_algorithm_draws_every_sample(pipe, scorer):
    result = synthesize(pipe, scorer, EDITS, 0, settings(), early_stop=False)
    assert len(result.tries) == 3 * 5 and len(result.kept) == 3 * 2
    best = synthesize(pipe, scorer, EDITS[:1], 0, settings(), early_stop=False)
    dirs = sorted((t["clip_direction"] for t in best.tries), reverse=True)
    assert [k["clip_direction"] for k in best.kept] == dirs[:2]


def test_nothing_passes_means_n_samples_tries_and_reasons(pipe, scorer):
    result = synthesize(pipe, scorer, EDITS[:2], 0, settings(thresholds=PASS_NONE))
    assert len(result.tries) == 2 * 5 and not result.kept and result.pairs.shape[0] == 0
    assert all(len(t["reasons"]) == 4 and not t["passed"] for t in result.tries)
    report = filter_report(result.tries, 2, [])
    assert report["edits_without_pairs"] == 2 and report["pass_rate"] == 0
    assert set(report["rejections"].values()) == {10}


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max_out_samples"):
        PairSettings(n_samples=2, max_out_samples=3)
    with pytest.raises(ValueError, match="guidance range"):
        PairSettings(guidance=(15.0, 7.5))
    assert PROFILES["original"] == ClipThresholds(0.2, 0.2, 0.7)


def test_shards_resume_and_partitions_split_the_work(pipe, scorer, tmp_path):
    edits = [CaptionEdit(f"x{i}", f"a cat number {i}", "make it a dog", f"a dog number {i}") for i in range(5)]
    s = settings(n_samples=2, max_out_samples=1)
    first = run_shards(pipe, scorer, edits, 0, s, tmp_path, shard_size=2, progress=False)
    assert (first.computed, first.reused, len(first.shards)) == (3, 0, 3)
    snapshot = {p: (p / "pairs.npy").read_bytes() for p in first.shards}
    import shutil

    shutil.rmtree(first.shards[1])
    again = run_shards(pipe, scorer, edits, 0, s, tmp_path, shard_size=2, progress=False)
    assert (again.computed, again.reused) == (1, 2)
    assert {p: (p / "pairs.npy").read_bytes() for p in again.shards} == snapshot
    parts = [run_shards(pipe, scorer, edits, 0, s, tmp_path, 2, 2, k, progress=False) for k in (0, 1)]
    assert [p.name for p in parts[0].shards] == ["shard-00000", "shard-00002"]
    assert [p.name for p in parts[1].shards] == ["shard-00001"]
    assert all(p.computed == 0 for p in parts)
    changed = run_shards(pipe, scorer, edits, 1, s, tmp_path, 2, progress=False)  # another seed: all new
    assert changed.computed == 3
    recoded = run_shards(pipe, scorer, edits, 1, s, tmp_path, 2, progress=False, code="other")  # other code: all new
    assert recoded.computed == 3
    with pytest.raises(ValueError, match="partition"):
        run_shards(pipe, scorer, edits, 0, s, tmp_path, 2, 2, 2)


def test_published_dataset_loads_and_is_reproducible(pipe, scorer, tmp_path):
    import datasets

    shard = tmp_path / "work"
    run_shards(pipe, scorer, EDITS, 0, settings(), shard, shard_size=2, progress=False)
    shards = [read_shard(p) for p in sorted(shard.iterdir())]
    edits = {e.id: e for e in EDITS}
    rows = rows_from_shards(((pairs, kept) for pairs, kept, _ in shards), edits, max_per_edit=1)
    assert len(rows) == 3
    for out in ("a", "b"):
        write_dataset(tmp_path / out, rows, "card", rows_per_file=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["README.md", "data/train-00000-of-00002.parquet",
                                       "data/train-00001-of-00002.parquet"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    ds = datasets.load_dataset(str(tmp_path / "a"), split="train")
    assert len(ds) == 3 and isinstance(ds.features["input_image"], datasets.Image)
    first = ds[0]
    assert first["edit_prompt"] == EDITS[0].edit and first["input_image"].size == (64, 64)
    assert np.array_equal(np.asarray(first["edited_image"]), shards[0][0][0][1])
    assert Path(tmp_path / "a" / "README.md").read_text() == "card"


def test_load_published_is_not_fooled_by_the_datasets_cache(pipe, scorer, tmp_path, monkeypatch):
    """Two projects with the same relative dataset path: each reads its own rows."""
    from manip.ip2p.dataset import load_published

    work = tmp_path / "work"
    run_shards(pipe, scorer, EDITS, 0, settings(), work, shard_size=3, progress=False)
    pairs, kept, _ = read_shard(work / "shard-00000")
    rows = rows_from_shards([(pairs, kept)], {e.id: e for e in EDITS})
    for name, n in (("one", 2), ("two", 5)):
        project = tmp_path / name
        write_dataset(project / "data/ip2p/dataset", rows[:n], "card")
        monkeypatch.chdir(project)
        ds = load_published("data/ip2p/dataset")
        assert len(ds) == n and ds[0]["edit_prompt"] == EDITS[0].edit
