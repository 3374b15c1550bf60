"""End to end through the real DVC CLI on the tiny profile, in a temporary git + DVC repo:
the whole DAG reproduces, a second `dvc repro` has nothing to do, the result loads with plain
diffusers, data/world round-trips through a local remote byte for byte, a fresh clone pulls every
output from the remote, and `dvc exp run -S` sweeps a stage's parameter."""
from __future__ import annotations

import csv
import io
import shutil

import pytest

from repo_fixtures import STAGES, dvc, dvc_status, git, make_repo, run, tree_digest

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


def test_fresh_clone_pulls_every_output(built, tmp_path):
    repo, _ = built
    dvc(repo, "remote", "add", "-d", "-f", "shared", str(tmp_path / "remote"))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "pipeline outputs and remote")
    dvc(repo, "push")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    dvc(clone, "pull")
    assert dvc_status(clone) == {}
    for path in ("data/world", "models/base", "models/clip", "data/ip2p/dataset"):
        assert tree_digest(clone / path) == tree_digest(repo / path), path


def test_experiment_sweep_of_a_stage_parameter(built, tmp_path):
    """`dvc exp run -S` on one stage, then `dvc exp show`, `dvc metrics diff` and `dvc plots show`."""
    repo, _ = built
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", "baseline")
    for n in (3, 4):
        dvc(repo, "exp", "run", "-S", f"ip2p.captions.n={n}", "ip2p_captions")
    table = list(csv.DictReader(io.StringIO(dvc(repo, "exp", "show", "--csv", "--no-pager").stdout)))
    # `dvc exp show` prefixes a column with its file only where the bare name is ambiguous.
    columns = list(table[0])
    param = next(c for c in columns if c in ("ip2p.captions.n", "params.yaml:ip2p.captions.n"))
    metric = next(c for c in columns if c in ("captions", "metrics/ip2p_captions.json:captions"))
    swept = {row[param]: row[metric] for row in table if row.get("Experiment")}
    assert swept.get("3") == "3" and swept.get("4") == "4", (swept, columns)
    diff = dvc(repo, "metrics", "diff", "HEAD", "--md").stdout
    assert "metrics/ip2p_captions.json" in diff and "captions" in diff, diff
    dvc(repo, "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file()
