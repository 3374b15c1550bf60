"""Contrastive CLIP training shared by the `text_encoder` and `evaluator` stages."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel, CLIPTokenizer

from manip.models.factory import make_clip
from manip.training.clip import retrieval_accuracy, train_clip
from manip.world.dataset import WorldSplit, load_split

from .common import fingerprint, loop_config
from .params import ClipParams, Params

CKPT_ROOT = "checkpoints"


def fit_clip(params: Params, p: ClipParams, tokenizer: CLIPTokenizer, splits: list[str], seed: int,
             name: str) -> tuple[CLIPModel, list[dict], dict]:
    torch.manual_seed(seed)
    data = [load_split(f"data/world/{s}") for s in splits]
    images = np.concatenate([np.asarray(d.images) for d in data])
    captions = [c for d in data for c in d.captions]
    model = make_clip(p.hidden_size, p.layers, p.heads, p.projection_dim, p.vision_hidden_size,
                      p.vision_layers, p.patch_size, params.world.size)
    result = train_clip(model, tokenizer, images, captions, loop_config(p.train), p.train.batch_size, seed,
                        Path(CKPT_ROOT) / name, desc=name, fingerprint=fingerprint(p, seed))
    test: WorldSplit = load_split("data/world/test")
    acc = retrieval_accuracy(result.model, tokenizer, np.asarray(test.images), [c[0] for c in test.captions])
    return result.model, result.history, {"test_retrieval_top1_of_100": round(acc, 4), "train_seconds": result.seconds}
