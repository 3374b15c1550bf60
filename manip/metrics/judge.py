"""Attribute judge: a CNN that reads a scene description back from an image.

Trained on real renders, it scores generations by the attributes their prompts asked for:
which object sits in which slot, its colour, the background, time of day and style. Saved
and loaded with diffusers' `ModelMixin` machinery (safetensors + config.json).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from manip.training.images import to_tensor
from manip.world.scene import Scene
from manip.world.vocab import ALL_STYLES, BACKGROUNDS, COLOURS, OBJECTS, SLOTS, TIMES

OBJECT_NAMES = list(OBJECTS)
EMPTY = len(OBJECT_NAMES)  # slot class meaning "no object here"
HEADS = {
    "background": list(BACKGROUNDS), "time": list(TIMES), "style": list(ALL_STYLES),
}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU(), nn.MaxPool2d(2),
    )


class AttributeJudge(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, width: int = 32, image_size: int = 64):
        super().__init__()
        w = width
        stem = nn.Sequential(nn.Conv2d(3, w, 4, stride=2, padding=1), nn.BatchNorm2d(w), nn.SiLU())
        self.features = nn.Sequential(stem, _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 4 * w))
        side = image_size // 16
        # Slot heads read a horizontal strip of the feature map, scene heads the pooled whole.
        self.slot_pool = nn.AdaptiveAvgPool2d((1, 3))
        self.slot_object = nn.Linear(4 * w, len(OBJECT_NAMES) + 1)
        self.slot_colour = nn.Linear(4 * w, len(COLOURS))
        self.slot_mix = nn.Conv1d(4 * w, 4 * w, 3, padding=1)
        self.scene = nn.ModuleDict({k: nn.Linear(4 * w * side * side, len(v)) for k, v in HEADS.items()})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map every head reads, flattened: what a distribution distance between
        image sets should compare, since it is trained to tell objects, slots and scenes apart."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        slots = torch.relu(self.slot_mix(self.slot_pool(f).squeeze(2))).transpose(1, 2)  # (N, 3, C)
        out = {k: head(f.flatten(1)) for k, head in self.scene.items()}
        out["slot_object"] = self.slot_object(slots)
        out["slot_colour"] = self.slot_colour(slots)
        return out


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    t = {k: torch.tensor([v.index(getattr(s, k)) for s in scenes]) for k, v in HEADS.items()}
    obj = torch.full((len(scenes), 3), EMPTY)
    col = torch.full((len(scenes), 3), -100)  # ignored where the slot is empty
    for i, s in enumerate(scenes):
        for o in s.objects:
            j = SLOTS.index(o.slot)
            obj[i, j] = OBJECT_NAMES.index(o.name)
            col[i, j] = list(COLOURS).index(o.colour)
    t["slot_object"], t["slot_colour"] = obj, col
    return t


def judge_loss(out: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]) -> torch.Tensor:
    ce = nn.functional.cross_entropy
    loss = sum(ce(out[k], tgt[k]) for k in HEADS)
    loss = loss + ce(out["slot_object"].flatten(0, 1), tgt["slot_object"].flatten())
    return loss + ce(out["slot_colour"].flatten(0, 1), tgt["slot_colour"].flatten(), ignore_index=-100)


@torch.no_grad()
def predict(judge: AttributeJudge, images: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Arg-max class per head for uint8 NHWC images."""
    judge.eval()
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(images), batch):
        for k, v in judge(to_tensor(images[i : i + batch]).to(judge.device)).items():
            outs.setdefault(k, []).append(v.argmax(-1).cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


@torch.no_grad()
def embeddings(judge: AttributeJudge, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """`AttributeJudge.embed` of uint8 NHWC images, (N, D)."""
    judge.eval()
    return np.concatenate([judge.embed(to_tensor(images[i : i + batch]).to(judge.device)).cpu().numpy()
                           for i in range(0, len(images), batch)])


def objects_in_place(pred: dict[str, np.ndarray], scenes: list[Scene]) -> np.ndarray:
    """Per image: is every slot's object the requested one (each object in its own slot, no
    other object anywhere)?"""
    return (pred["slot_object"] == scene_targets(scenes)["slot_object"].numpy()).all(1)


def attribute_hits(pred: dict[str, np.ndarray], scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Per-image booleans: is each attribute the prompt asked for present?

    `object`: every requested object appears in some slot; `position`: the occupied slots are
    exactly the requested ones; `colour`: each requested object's tint is right; `all`: every
    object in its own slot with its colour, and background, time and style right.
    """
    tgt = scene_targets(scenes)
    hits = {k: pred[k] == tgt[k].numpy() for k in HEADS}
    t_obj, p_obj = tgt["slot_object"].numpy(), pred["slot_object"]
    hits["position"] = ((p_obj != EMPTY) == (t_obj != EMPTY)).all(1)
    hits["object"] = np.array([
        all(o in set(p_row[p_row != EMPTY]) for o in t_row[t_row != EMPTY]) for p_row, t_row in zip(p_obj, t_obj)
    ])
    t_col = tgt["slot_colour"].numpy()
    hits["colour"] = np.where(t_col >= 0, pred["slot_colour"] == t_col, True).all(1)
    hits["all"] = objects_in_place(pred, scenes) & np.all([hits[k] for k in ("background", "time", "style", "colour")], axis=0)
    return hits
