"""Scores of a customized model, in the columns of the lecture's tables.

Subject fidelity: the attribute judge's verdict that the concept is there (the object in some
slot, or the style), its image-feature similarity to the references (the DINO column: a network
trained to tell objects and scenes apart) and CLIP-I. Prompt fidelity: CLIP-T against the prompt
with the concept written as its real name (the evaluator CLIP knows the reserved words), and the
judge's accuracy on the scene the prompt asked for (background, time, style). KID on the judge's
features against exact renders of the prompted scenes. The same function scores those renders
themselves: the "Real" ceiling row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from manip.metrics.clip_scores import ClipScorer
from manip.metrics.judge import OBJECT_NAMES, AttributeJudge, attribute_hits, embeddings, objects_in_place, predict
from manip.metrics.kid import kid
from manip.world import Scene


@dataclass
class Scorers:
    clip: ClipScorer
    judge: AttributeJudge


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity over all pairs of rows of a and b."""
    a = F.normalize(torch.as_tensor(a, dtype=torch.float32), dim=-1)
    b = F.normalize(torch.as_tensor(b, dtype=torch.float32), dim=-1)
    return float((a @ b.T).mean())


def concept_scores(scorers: Scorers, images: np.ndarray, scenes: Sequence[Scene], texts: Sequence[str],
                   references: np.ndarray, real: np.ndarray, kind: str) -> dict[str, float]:
    """`images` sampled for prompts `texts` (concept named by its real word) whose perfect
    renders show `scenes`; `real` are such renders (the KID reference)."""
    hits = attribute_hits(predict(scorers.judge, images), list(scenes))
    subject = _subject(hits, kind)
    scene_keys = ("background", "time") if kind == "style" else ("background", "time", "style")
    judge_feats = embeddings(scorers.judge, images)
    subset = max(2, min(len(images), len(real)) // 2)
    kid_mean, kid_std = kid(judge_feats, embeddings(scorers.judge, real), subset_size=subset)
    return {
        "subject_accuracy": round(float(subject.mean()), 4),
        "judge_feature_similarity": round(_mean_cosine(judge_feats, embeddings(scorers.judge, references)), 4),
        "clip_i": round(_mean_cosine(scorers.clip.image_features(images), scorers.clip.image_features(references)), 4),
        "clip_t": round(float(scorers.clip.clip_t(images, texts).mean()), 4),
        "scene_accuracy": round(float(np.all([hits[k] for k in scene_keys], axis=0).mean()), 4),
        "kid": round(kid_mean, 5), "kid_std": round(kid_std, 5),
    }


def pair_scores(scorers: Scorers, images: np.ndarray, scenes: Sequence[Scene],
                texts: Sequence[str]) -> dict[str, float]:
    """Multi-concept prompts: both concepts present (in any slot), each in its own slot, each
    concept present on its own (the first and second object of the scenes), CLIP-T."""
    pred = predict(scorers.judge, images)
    hits = attribute_hits(pred, list(scenes))
    in_place = objects_in_place(pred, list(scenes))
    present = [[OBJECT_NAMES.index(s.objects[k].name) in row for row, s in zip(pred["slot_object"], scenes)]
               for k in (0, 1)]
    return {"both_present": round(float(hits["object"].mean()), 4), "both_in_place": round(float(in_place.mean()), 4),
            "first_present": round(float(np.mean(present[0])), 4),
            "second_present": round(float(np.mean(present[1])), 4),
            "clip_t": round(float(scorers.clip.clip_t(images, texts).mean()), 4)}


def drift_scores(scorers: Scorers, before: np.ndarray, after: np.ndarray, scenes: Sequence[Scene],
                 kind: str) -> dict[str, float]:
    """Language drift on class prompts: is the class still drawn (judge), and how far the samples
    of the same seeds moved (CLIP-I between before and after, 1 = unchanged)."""
    def accuracy(images: np.ndarray) -> float:
        return float(_subject(attribute_hits(predict(scorers.judge, images), list(scenes)), kind).mean())

    same_seed = (scorers.clip.image_features(before) * scorers.clip.image_features(after)).sum(-1).mean()
    return {"class_accuracy_before": round(accuracy(before), 4), "class_accuracy_after": round(accuracy(after), 4),
            "same_seed_clip_i": round(float(same_seed), 4)}


def _subject(hits: dict[str, np.ndarray], kind: str) -> np.ndarray:
    return hits["style"] if kind == "style" else hits["object"]
