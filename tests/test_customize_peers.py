"""The customization benchmark (`benchmarks/customize_speed.py`) compares equal work: the
official diffusers examples it runs unchanged in the peers environment (`make peers`) train a
step on the shipped base model and the same reference images, and train exactly as many values
as our method with the matching config. Checked here for the two whose settings need matching
(LoRA: rank and target layers; Custom Diffusion: modifier token, K/V only); Textual Inversion
(one vector) and DreamBooth (the whole UNet) match by construction, and the benchmark records
both sides' counts for all four. Each case takes 10-25 s, mostly the example process starting."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repo_fixtures import ROOT, tool_env

pytestmark = pytest.mark.slow

BASE = ROOT / "models" / "base"


@pytest.fixture(scope="module")
def bench():
    from benchmarks import customize_speed

    if not customize_speed.EXAMPLES.is_dir():
        pytest.skip(f"the diffusers examples are not at {customize_speed.EXAMPLES} (set MANIP_PEERS)")
    if not (ROOT / ".venv-peers" / "bin" / "python").exists():
        pytest.skip("the peers environment is missing: run `make peers`")
    return customize_speed


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    for i in range(2):
        img = np.full((64, 64, 3), 255, np.uint8)
        img[16:48, 16:48] = rng.integers(0, 256, 3, dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("method", ["lora", "custom_diffusion"])
def test_example_trains_the_same_values_as_ours(bench, references, method, tmp_path):
    from diffusers import StableDiffusionPipeline

    from manip.customize import METHODS, Concept, load_reference_images

    out = tmp_path / "peer"
    lr = bench.ours_config(method, 1, 2).lr
    cmd = bench.peer_command(str(ROOT / ".venv-peers" / "bin" / "python"), method, str(BASE), references, 2, 1, lr, out)
    proc = subprocess.run(cmd, cwd=tmp_path, env={**tool_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    peer = bench.peer_trained_values(method, out)

    pipe = StableDiffusionPipeline.from_pretrained(BASE, safety_checker=None, requires_safety_checker=False)
    paths = sorted(references.glob("*.png"))
    concept = Concept(name="teapot", images=load_reference_images(paths, 64), templates=("a photo of {}",) * 2,
                      class_noun="teapot", placeholder=bench.PLACEHOLDER.get(method, "<teapot>"))
    report = METHODS[method](pipe, bench.ours_config(method, 1, 2)).fit([concept], tmp_path / "ours")
    assert report.trainable_parameters == peer > 0
