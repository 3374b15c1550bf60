"""The published InstructPix2Pix dataset is what the official diffusers example trains on: its
`train_instruct_pix2pix.py`, unchanged, runs a few steps on the dataset and base model the
stages produce and saves a pipeline diffusers loads. The example runs in the peers environment
(`make peers`) because it needs torchvision."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from repo_fixtures import ROOT, tool_env

pytestmark = pytest.mark.slow

PEERS = Path(os.environ.get("MANIP_PEERS", ROOT.parent / "shared" / "peers"))
EXAMPLE = PEERS / "diffusers" / "examples" / "instruct_pix2pix" / "train_instruct_pix2pix.py"
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


@pytest.fixture(scope="module")
def project(tiny_world, tmp_path_factory):
    from test_ip2p_stages import make_project, stage

    if not EXAMPLE.is_file():
        pytest.skip(f"the diffusers example is not at {EXAMPLE} (set MANIP_PEERS to the peers folder)")
    if not PEER_PYTHON.exists():
        pytest.skip("the peers environment is missing: run `make peers`")
    root = make_project(tmp_path_factory.mktemp("peer") / "project", tiny_world)
    for name in ("ip2p_captions", "ip2p_edits", "ip2p_pairs", "ip2p_dataset"):
        stage(root, name)
    return root


def test_diffusers_example_trains_on_the_published_dataset(project, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    out = tmp_path / "example-out"
    env = {**tool_env(), "HF_DATASETS_OFFLINE": "1"}
    cmd = [str(PEER_PYTHON), str(EXAMPLE), "--pretrained_model_name_or_path", "models/base",
           "--dataset_name", "data/ip2p/dataset", "--resolution", "64", "--train_batch_size", "4",
           "--max_train_steps", "3", "--learning_rate", "1e-4", "--seed", "0", "--output_dir", str(out),
           "--dataloader_num_workers", "0", "--mixed_precision", "no"]
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Total optimization steps = 3" in proc.stderr + proc.stdout
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(out)
    assert pipe.unet.config.in_channels == 2 * pipe.vae.config.latent_channels
