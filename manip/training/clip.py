"""Contrastive image-text training of a small `CLIPModel` on captioned renders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from manip.metrics.clip_scores import projected

from .images import batch_rng, to_tensor
from .loop import LoopConfig, TrainResult, train


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="longest", truncation=True, return_tensors="pt").input_ids


def train_clip(model: CLIPModel, tokenizer: CLIPTokenizer, images: np.ndarray, captions: list[list[str]],
               cfg: LoopConfig, batch_size: int, seed: int, checkpoint_dir: Path, desc: str = "clip",
               fingerprint: dict | None = None) -> TrainResult:
    """Symmetric InfoNCE over in-batch negatives; each sample uses a random caption phrasing."""

    def loss_fn(step: int):
        rng = batch_rng(seed, step)
        idx = np.sort(rng.choice(len(images), batch_size, replace=False))
        texts = [captions[i][int(rng.integers(len(captions[i])))] for i in idx]
        out = model(input_ids=tokenize(tokenizer, texts), pixel_values=to_tensor(images[idx]))
        target = torch.arange(batch_size)
        loss = (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target)) / 2
        acc = (out.logits_per_image.argmax(1) == target).float().mean()
        return loss, {"acc": acc.item()}

    return train(model, loss_fn, cfg, checkpoint_dir, desc=desc, fingerprint=fingerprint)


@torch.no_grad()
def retrieval_accuracy(model: CLIPModel, tokenizer: CLIPTokenizer, images: np.ndarray, texts: list[str],
                       group: int = 100) -> float:
    """Image -> text top-1 accuracy within groups of `group` pairs."""
    model.eval()
    hits = 0
    for i in range(0, len(texts) - group + 1, group):
        img = F.normalize(projected(model.get_image_features(pixel_values=to_tensor(images[i : i + group]))), dim=-1)
        txt = F.normalize(projected(model.get_text_features(input_ids=tokenize(tokenizer, texts[i : i + group]))), dim=-1)
        hits += int((img @ txt.T).argmax(1).eq(torch.arange(group)).sum())
    return hits / (len(texts) // group * group)
