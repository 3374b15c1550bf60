"""Shared fixtures: the emoji artwork, a 64 px renderer and a tiny rendered world.

Everything runs offline on one thread so the suite can share a 2-core machine with
long trainings.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MANIP_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
ARTWORK_DIR = ROOT / ".cache" / "emoji-datasource-google"

# Tiny world: enough scenes per split for split-membership checks, cheap to render.
TINY_WORLD = {"n_train": 48, "n_val": 16, "n_test": 24, "n_concepts": 16}


def tiny_params_dict(**world) -> dict:
    return {"seed": 3, "world": {"artwork_dir": str(ARTWORK_DIR), "size": 64, **TINY_WORLD, **world}}


@pytest.fixture(scope="session")
def artwork():
    from manip.world import Artwork, ArtworkMissing

    if not (ARTWORK_DIR / "emoji.json").is_file():
        pytest.skip(f"emoji artwork not installed at {ARTWORK_DIR}; run `make artwork`")
    try:
        return Artwork(ARTWORK_DIR)
    except ArtworkMissing as err:
        pytest.skip(f"emoji artwork incomplete: {err}")


@pytest.fixture(scope="session")
def renderer(artwork):
    from manip.world import Renderer

    return Renderer(artwork, 64)


@pytest.fixture(scope="session")
def tiny_params(artwork):
    from stages.params import Params

    return Params.model_validate(tiny_params_dict())


@pytest.fixture(scope="session")
def tiny_world(tiny_params, tmp_path_factory) -> Path:
    """data/world built by the real stage code with tiny params; returns the world directory."""
    from stages.world import build

    out = tmp_path_factory.mktemp("world-a") / "data" / "world"
    build(tiny_params, out)
    return out


def open_clip_reference_tokenizer():
    """open_clip's reference tokenizer module (a pure-Python port of OpenAI's BPE), loaded by
    file path: importing the `open_clip` package pulls in torchvision, which the CPU
    environment does not have. Skips the test when open_clip is not installed."""
    import importlib.util

    from manip.models.tokenizer import open_clip_dir

    try:
        path = open_clip_dir() / "tokenizer.py"
    except FileNotFoundError as err:
        pytest.skip(str(err))
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
