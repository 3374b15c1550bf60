"""The InstructPix2Pix dataset stages in a project-shaped folder: captions -> edits -> pairs ->
dataset, bad inputs reported, the openai backend through the stage, and `kill -9` in the middle
of pair synthesis followed by a rerun giving a byte-identical dataset."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_params_dict
from llm_server import ScriptedLLM, serve
from repo_fixtures import COMMAND_TIMEOUT, ROOT, tool_env, tree_digest
from tiny_pipeline import save_tiny_clip_and_judge, saved_tiny_pipeline

SECRET = "sk-stage-secret-0987654321"
IP2P = {
    "captions": {"n": 8},
    "evaluate": {"n_cases": 7, "steps": 2, "image_guidance_scales": [1.0, 1.5], "batch_size": 4},
    "finetune": {"train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup": 1, "ema_decay": 0.9,
                           "checkpoint_every": 2}},
    "pairs": {"steps": 8, "n_samples": 3, "max_out_samples": 2, "batch_size": 4, "shard_size": 1,
              "filter": {"profile": "original", "clip_text": -1.0, "clip_direction": -1.0, "clip_image": -1.0}},
}


def make_project(root: Path, world: Path, ip2p: dict = IP2P) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({**tiny_params_dict(), "ip2p": ip2p}))
    (root / "data").mkdir()
    (root / "data" / "world").symlink_to(world, target_is_directory=True)
    saved_tiny_pipeline(root / "models" / "base", "epsilon", smooth=True, image_size=64)
    save_tiny_clip_and_judge(root / "models")
    return root


def stage(root: Path, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**tool_env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT)
    if check and proc.returncode != 0:
        pytest.fail(f"stage {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", pytrace=False)
    return proc


@pytest.fixture(scope="module")
def reference(tiny_world, tmp_path_factory) -> Path:
    """A project where every stage ran once, uninterrupted."""
    root = make_project(tmp_path_factory.mktemp("ref") / "project", tiny_world)
    for name in ("ip2p_captions", "ip2p_edits", "ip2p_pairs", "ip2p_dataset"):
        stage(root, name)
    return root


def test_stages_produce_a_loadable_dataset(reference):
    import datasets

    captions = json.loads((reference / "metrics/ip2p_captions.json").read_text())
    edits = json.loads((reference / "metrics/ip2p_edits.json").read_text())
    pairs = json.loads((reference / "metrics/ip2p_pairs.json").read_text())
    meta = json.loads((reference / "metrics/ip2p_dataset.json").read_text())
    assert captions["captions"] == 8 and edits["edits"] == 8 and edits["backend"] == "rules"
    assert pairs["tries"] == 16 and pairs["pass_rate"] == 1.0 and pairs["shards"] == 8
    assert meta["pairs"] == 16 and sum(meta["pairs_by_kind"].values()) == 16
    ds = datasets.load_dataset(str(reference / "data/ip2p/dataset"), split="train")
    assert len(ds) == 16 and {"input_image", "edit_prompt", "edited_image", "truth"} <= set(ds.column_names)
    assert json.loads(ds[0]["truth"])["target"]["background"]
    card = (reference / "data/ip2p/dataset/README.md").read_text()
    assert "pairs: 16 from 8 of 8 caption edits" in card and "config_name: default" in card
    assert (reference / "plots/ip2p_pairs.png").is_file()


def test_kill_9_during_pairs_then_rerun_is_byte_identical(reference, tiny_world, tmp_path):
    root = make_project(tmp_path / "project", tiny_world)
    stage(root, "ip2p_captions")
    stage(root, "ip2p_edits")
    env = {**tool_env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "stages.ip2p_pairs"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pairs = root / "data/ip2p/pairs"
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline and proc.poll() is None and len(list(pairs.glob("shard-*/shard.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(pairs.glob("shard-*/shard.json")))
    assert 2 <= done < 8, f"{done} shards finished before the kill; the test needs a run that was cut short"
    rerun = stage(root, "ip2p_pairs")
    assert f"{8 - done} shards computed in this run, {done} reused" in rerun.stdout
    stage(root, "ip2p_dataset")
    assert tree_digest(root / "data/ip2p/dataset") == tree_digest(reference / "data/ip2p/dataset")
    assert tree_digest(pairs) == tree_digest(reference / "data/ip2p/pairs")


def test_partitions_fill_the_same_shards(reference, tiny_world, tmp_path):
    """Three partitions on two worker processes at once produce the one-worker dataset."""
    from concurrent.futures import ThreadPoolExecutor

    root = make_project(tmp_path / "project", tiny_world)
    for name in ("ip2p_captions", "ip2p_edits"):
        stage(root, name)
    with ThreadPoolExecutor(max_workers=2) as workers:
        list(workers.map(lambda k: stage(root, "ip2p_pairs", "--partition", str(k), "--n-partitions", "3"), range(3)))
    assert "0 shards computed in this run, 8 reused" in stage(root, "ip2p_pairs").stdout
    assert tree_digest(root / "data/ip2p/pairs") == tree_digest(reference / "data/ip2p/pairs")
    bad = stage(root, "ip2p_pairs", "--partition", "3", "--n-partitions", "3", check=False)
    assert bad.returncode == 2 and "partition must be in [0, 3)" in bad.stderr and "Traceback" not in bad.stderr


def test_dataset_stage_refuses_missing_shards(tiny_world, tmp_path):
    root = make_project(tmp_path / "project", tiny_world)
    for name in ("ip2p_captions", "ip2p_edits"):
        stage(root, name)
    out = stage(root, "ip2p_dataset", check=False)
    assert out.returncode == 2 and "pair shards are missing" in out.stderr and "Traceback" not in out.stderr


def test_bad_captions_and_params_are_reported(tiny_world, tmp_path):
    bad = tmp_path / "captions.jsonl"
    bad.write_bytes(b'{"id": "a", "caption": "a cat"}\n{"id": "b", "caption": ""}\n\xff\xfe\n'
                    + json.dumps({"id": "c", "caption": "word " * 100}).encode() + b"\n")
    root = make_project(tmp_path / "project", tiny_world,
                        {"captions": {"source": "jsonl", "path": str(bad)}, "edits": {"backend": "rules"}})
    stage(root, "ip2p_captions")
    metrics = json.loads((root / "metrics/ip2p_captions.json").read_text())
    assert metrics["captions"] == 1 and metrics["rejected_by_reason"] == {"empty": 1, "over-long": 1, "unreadable": 1}
    stage(root, "ip2p_edits")
    quarantine = (root / "data/ip2p/edits_quarantine.jsonl").read_text()
    assert '"reason": "no scene"' in quarantine

    (root / "params.yaml").write_text(yaml.safe_dump({**tiny_params_dict(), "ip2p": {"captions": {"source": "jsonl"}}}))
    out = stage(root, "ip2p_captions", check=False)
    assert out.returncode == 2 and "needs `path`" in out.stderr


def test_openai_backend_through_the_stage(tiny_world, tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": f"c{i}", "caption": t}) + "\n"
                                for i, t in enumerate(["a cat on a sofa", "a red car", "a bowl of soup"])))
    llm = ScriptedLLM({"a red car": ["500", "malformed"], "a bowl of soup": ["429"]})
    with serve(llm) as url:
        ip2p = {"captions": {"source": "jsonl", "path": str(captions)},
                "edits": {"backend": "openai", "openai": {"model": "local", "base_url": url, "cache_dir": "llm-cache",
                                                          "backoff": 0.01, "timeout": 5}}}
        root = make_project(tmp_path / "project", tiny_world, ip2p)
        stage(root, "ip2p_captions")
        env_missing = stage(root, "ip2p_edits", check=False)
        assert env_missing.returncode == 2 and "OPENAI_API_KEY" in env_missing.stderr
        os.environ["OPENAI_API_KEY"] = SECRET
        try:
            first = stage(root, "ip2p_edits")
            second = stage(root, "ip2p_edits")
        finally:
            del os.environ["OPENAI_API_KEY"]
    metrics = json.loads((root / "metrics/ip2p_edits.json").read_text())
    assert metrics["edits"] == 2 and metrics["quarantined_by_reason"] == {"malformed": 1}
    assert "5 requests sent" in first.stdout and "0 requests sent" in second.stdout
    for path in [*root.rglob("*.json*"), *(root / "llm-cache").rglob("*")]:
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    assert SECRET not in first.stdout + first.stderr


def test_finetune_single_and_data_parallel_agree(reference, tmp_path):
    """Two CPU processes (torchrun, accelerate's gloo group) train the same model as one process."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from safetensors.torch import load_file

    stage(reference, "ip2p_finetune")
    single = StableDiffusionInstructPix2PixPipeline.from_pretrained(reference / "models/ip2p")
    assert single.unet.config.in_channels == 8
    metrics = json.loads((reference / "metrics/ip2p_finetune.json").read_text())
    assert metrics["pairs"] == 16 and metrics["processes"] == 1 and metrics["steps"] == 4

    twin = tmp_path / "twin"
    (twin / "data/ip2p").mkdir(parents=True)
    (twin / "models").mkdir()
    (twin / "params.yaml").write_text((reference / "params.yaml").read_text())
    (twin / "data/ip2p/dataset").symlink_to(reference / "data/ip2p/dataset", target_is_directory=True)
    (twin / "models/base").symlink_to(reference / "models/base", target_is_directory=True)
    env = {**tool_env(), "PYTHONPATH": str(ROOT)}
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "stages.ip2p_finetune"]
    proc = subprocess.run(cmd, cwd=twin, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((twin / "metrics/ip2p_finetune.json").read_text())["processes"] == 2
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(reference / "models/ip2p" / weights), load_file(twin / "models/ip2p" / weights)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst


def test_evaluate_scores_every_scale(reference):
    if not (reference / "models/ip2p/model_index.json").is_file():
        stage(reference, "ip2p_finetune")
    stage(reference, "ip2p_evaluate")
    m = json.loads((reference / "metrics/ip2p_eval.json").read_text())
    assert m["n_cases"] == 7 and set(m["per_image_guidance"]) == {"1.0", "1.5"}
    kinds = set(m["per_kind_at_default"])
    assert kinds <= {"object", "colour", "background", "time", "add", "remove", "style"} and len(kinds) >= 4
    for scores in [*m["per_image_guidance"].values(), m["unchanged_input_baseline"]]:
        assert 0 <= scores["success"] <= 1 and -1 <= scores["clip_direction"] <= 1
    assert m["unchanged_input_baseline"]["clip_image"] > 0.99
    curve = (reference / "plots/ip2p_tradeoff.csv").read_text().splitlines()
    assert curve[0].startswith("image_guidance_scale,clip_direction,clip_image") and len(curve) == 3
    from PIL import Image

    assert Image.open(reference / "plots/ip2p_eval_grid.png").size == (3 * 64 * 4, 3 * 64 * len(kinds))
