"""End to end through the real DVC CLI on the tiny profile, in a temporary git + DVC repo:
the whole DAG reproduces, a second `dvc repro` has nothing to do, the result loads with plain
diffusers, and data/world round-trips through a local remote byte for byte."""
from __future__ import annotations

import shutil

import pytest

from repo_fixtures import STAGES, dvc, dvc_status, make_repo, tree_digest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(repo, output of the first `dvc repro`)."""
    repo = make_repo(tmp_path_factory.mktemp("dvc") / "project")
    out = dvc(repo, "repro")
    return repo, out.stdout + out.stderr


def test_repro_runs_every_stage(built):
    repo, out = built
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, out[-3000:]
    lock = (repo / "dvc.lock").read_text()
    for stage in STAGES:
        assert f"\n  {stage}:\n" in lock
    for path in ("data/world/train", "models/base/model_index.json", "models/clip", "models/judge",
                 "metrics/base.json", "plots/base_grid.png"):
        assert (repo / path).exists(), path


def test_second_repro_has_nothing_to_do(built):
    repo, _ = built
    proc = dvc(repo, "repro")
    out = proc.stdout + proc.stderr
    assert "Running stage" not in out, out
    assert "Data and pipelines are up to date" in out, out


def test_status_clean(built):
    repo, _ = built
    assert dvc_status(repo) == {}


def test_dag_lists_stages(built):
    repo, _ = built
    out = dvc(repo, "dag").stdout
    for stage in STAGES:
        assert stage in out


def test_base_model_loads_with_plain_diffusers(built):
    import torch
    from diffusers import StableDiffusionPipeline

    repo, _ = built
    pipe = StableDiffusionPipeline.from_pretrained(repo / "models" / "base")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a cat on the beach", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_push_pull_restores_world(built, tmp_path):
    repo, _ = built
    before = tree_digest(repo / "data" / "world")
    assert before
    dvc(repo, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    dvc(repo, "push")
    shutil.rmtree(repo / "data" / "world")
    shutil.rmtree(repo / ".dvc" / "cache")
    assert dvc_status(repo) != {}
    dvc(repo, "pull")
    assert tree_digest(repo / "data" / "world") == before
    assert dvc_status(repo) == {}
