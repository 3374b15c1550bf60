"""Supervised training of the attribute judge on real renders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from manip.metrics.judge import AttributeJudge, judge_loss, scene_targets
from manip.world.scene import Scene

from .images import batch_rng, to_tensor
from .loop import LoopConfig, TrainResult, train


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Small brightness/contrast jitter and pixel noise so the judge tolerates generated images."""
    n = len(x)
    gain = torch.from_numpy(rng.uniform(0.85, 1.15, (n, 1, 1, 1))).float()
    bias = torch.from_numpy(rng.uniform(-0.1, 0.1, (n, 1, 1, 1))).float()
    noise = torch.from_numpy(rng.normal(0, 0.04, x.shape)).float()
    return (x * gain + bias + noise).clamp(-1, 1)


def train_judge(judge: AttributeJudge, images: np.ndarray, scenes: list[Scene], cfg: LoopConfig, batch_size: int,
                seed: int, checkpoint_dir: Path,
              fingerprint: dict | None = None) -> TrainResult:
    targets = scene_targets(scenes)

    def loss_fn(step: int):
        rng = batch_rng(seed, step)
        idx = np.sort(rng.choice(len(images), batch_size, replace=False))
        out = judge(_augment(to_tensor(images[idx]), rng))
        return judge_loss(out, {k: v[idx] for k, v in targets.items()}), {}

    return train(judge, loss_fn, cfg, checkpoint_dir, desc="judge", fingerprint=fingerprint)
