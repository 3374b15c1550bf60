"""Content keys of DVC stages (the Prefect task cache): what changes a stage's key, what does
not, and what invalidates a cached outcome."""
from __future__ import annotations

import os

import yaml

from pipelines.stage_cache import inputs_key, outputs_state

DVC_YAML = {"stages": {
    "train": {"cmd": "python train.py", "deps": ["data", "train.py"], "params": ["model.lr", {"extra.yaml": ["k"]}],
              "outs": ["model.bin"], "metrics": [{"metrics.json": {"cache": False}}]},
}}


def project(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"lr": 0.1, "width": 8}, "other": 1}))
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump({"k": "a"}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("one")
    (tmp_path / "train.py").write_text("print('train')\n")
    return tmp_path


def edit_yaml(path, update) -> None:
    data = yaml.safe_load(path.read_text())
    update(data)
    path.write_text(yaml.safe_dump(data))


def test_key_follows_deps_declared_params_and_command(tmp_path):
    root = project(tmp_path)
    key = inputs_key(root, "train")
    assert inputs_key(root, "train") == key
    edit_yaml(root / "params.yaml", lambda d: d.update(other=2))
    edit_yaml(root / "params.yaml", lambda d: d["model"].update(width=16))
    assert inputs_key(root, "train") == key, "params the stage does not declare do not count"
    changes = [
        lambda: (root / "data" / "x.txt").write_text("two"),
        lambda: (root / "data" / "y.txt").write_text("new file"),
        lambda: (root / "train.py").write_text("print('changed')\n"),
        lambda: edit_yaml(root / "params.yaml", lambda d: d["model"].update(lr=0.2)),
        lambda: edit_yaml(root / "extra.yaml", lambda d: d.update(k="b")),
        lambda: edit_yaml(root / "dvc.yaml", lambda d: d["stages"]["train"].update(cmd="python train.py --fast")),
    ]
    seen = {key}
    for change in changes:
        change()
        new = inputs_key(root, "train")
        assert new not in seen
        seen.add(new)


def test_rewritten_file_with_same_size_is_rehashed(tmp_path):
    root = project(tmp_path)
    key = inputs_key(root, "train")
    path = root / "data" / "x.txt"
    st = path.stat()
    path.write_text("owe")  # same size; the memo is keyed by mtime too
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert inputs_key(root, "train") != key


def test_outputs_state_sees_outputs_and_lock(tmp_path):
    root = project(tmp_path)
    missing = outputs_state(root, "train")
    assert set(missing["outs"]) == {"model.bin", "metrics.json"}
    (root / "model.bin").write_bytes(b"weights")
    (root / "metrics.json").write_text("{}")
    written = outputs_state(root, "train")
    assert written["outs"] != missing["outs"]
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train": {"cmd": "python train.py"}}}))
    locked = outputs_state(root, "train")
    assert locked["outs"] == written["outs"] and locked["lock"] != written["lock"]
    (root / "model.bin").write_bytes(b"other weights")
    assert outputs_state(root, "train")["outs"] != locked["outs"]


def test_checkouts_do_not_share_keys(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = project(tmp_path / "a"), project(tmp_path / "b")
    assert inputs_key(a, "train") != inputs_key(b, "train")
