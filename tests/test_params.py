"""params.yaml validation: every error names the dotted field, stages fail with one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.params import Params, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def dump(tmp_path: Path, data: dict) -> Path:
    return write(tmp_path, yaml.safe_dump(data))


@pytest.mark.parametrize(
    "data, field",
    [
        ({"vae": {"train": {"steps": 10, "batch_size": 2, "lr": 0.1, "bogus": 1}}}, "vae.train.bogus"),
        ({"vae": {"train": {"steps": "many", "batch_size": 2, "lr": 0.1}}}, "vae.train.steps"),
        ({"world": {"size": 30}}, "world.size"),
        ({"world": {"size": 68}}, "world.size"),  # not a multiple of 8
        ({"world": {"n_train": 0}}, "world.n_train"),
        ({"unet": {"uncond_prob": 1.5}}, "unet.uncond_prob"),
        ({"evaluate": {"guidance_scale": 0.5}}, "evaluate.guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"toplevel_typo": 1}, "toplevel_typo"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, data, field):
    path = dump(tmp_path, data)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    msg = str(info.value)
    assert f"{field}:" in msg, msg
    assert str(path) in msg


def test_several_errors_are_all_reported(tmp_path):
    path = dump(tmp_path, {"world": {"size": 30, "n_val": -3}})
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert "world.size" in str(info.value) and "world.n_val" in str(info.value)


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "world: {size: 64\nvae: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_empty_file_gives_defaults(tmp_path):
    assert load_params(write(tmp_path, "")) == Params()


def test_partial_file_keeps_defaults(tmp_path):
    p = load_params(dump(tmp_path, {"seed": 7, "world": {"size": 32}}))
    assert p.seed == 7 and p.world.size == 32 and p.world.n_train == Params().world.n_train


def test_repo_params_load():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert p.world.size == raw["world"]["size"]
    assert p.vae.train.steps == raw["vae"]["train"]["steps"]


def run_stage(params_path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MANIP_PARAMS": str(params_path), "MANIP_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.world"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return proc.stderr


def test_stage_with_bad_params_exits_2(tmp_path):
    path = dump(tmp_path, {"world": {"size": 30}})
    stderr = assert_one_line_error(run_stage(path, cwd=tmp_path))
    assert "world.size" in stderr
    assert not (tmp_path / "data").exists()


def test_stage_with_missing_artwork_exits_2(tmp_path):
    empty = tmp_path / "no-artwork"
    empty.mkdir()
    path = dump(tmp_path, {"world": {"artwork_dir": str(empty), "n_train": 1, "n_val": 1, "n_test": 1,
                                     "n_concepts": 1}})
    proc = run_stage(path, cwd=tmp_path)
    stderr = assert_one_line_error(proc)
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "make artwork" in stderr and str(empty) in stderr
    assert not (tmp_path / "data").exists()
