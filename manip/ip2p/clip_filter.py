"""The CLIP filter of generated pairs: both images must match their captions, the image change
must follow the caption change, and the edited image must stay close to the input.

`original` holds the thresholds of the InstructPix2Pix paper (ViT-L/14 CLIP on 512 px images).
`emojiworld` is recalibrated for the embedded evaluator CLIP, whose scores are spread much wider
(`python -m benchmarks.clip_filter_calibration`: the ground-truth renders of 400 validation
edits against the same images with another pair's captions or another pair's edited image).
Matching captions score CLIP-T >= 0.82 (1st percentile), another pair's captions < 0.68 (99th),
so 0.7. True edits have directional similarity >= 0.55 for 95% of them (1st percentile 0.29),
an unrelated edited image a median of 0.26, so 0.3, which lets almost every true edit through;
it is the three thresholds together that reject unrelated pairs. Image similarity of true edits
has a median of 0.69 but a style edit changes every pixel (style: median 0.41, 5th percentile
-0.03), unrelated images a median of 0.03, so 0.2 instead of 0.7. Together they pass 92% of
true pairs, no pair with another pair's captions and 0.25% of unrelated pairs; the `original`
thresholds would pass 46% of the true pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from manip.metrics.clip_scores import ClipScorer


@dataclass(frozen=True)
class ClipThresholds:
    clip_text: float = 0.2  # CLIP-T of each image with its own caption
    clip_direction: float = 0.2  # directional similarity
    clip_image: float = 0.7  # CLIP-I between input and edited image

    def reasons(self, scores: dict[str, float]) -> list[str]:
        """Why a candidate fails; empty when it passes."""
        out = []
        if scores["clip_text_input"] < self.clip_text:
            out.append("input image does not match its caption")
        if scores["clip_text_output"] < self.clip_text:
            out.append("edited image does not match its caption")
        if scores["clip_direction"] < self.clip_direction:
            out.append("change does not follow the edit")
        if scores["clip_image"] < self.clip_image:
            out.append("edited image too far from the input")
        return out


PROFILES: dict[str, ClipThresholds] = {
    "original": ClipThresholds(0.2, 0.2, 0.7),
    "emojiworld": ClipThresholds(0.7, 0.3, 0.2),
}
SCORE_NAMES: tuple[str, ...] = ("clip_text_input", "clip_text_output", "clip_direction", "clip_image")


def score_pairs(scorer: ClipScorer, inputs: np.ndarray, outputs: np.ndarray, input_captions: Sequence[str],
                output_captions: Sequence[str]) -> list[dict[str, float]]:
    """The four InstructPix2Pix filter scores of each (input, edited) image pair, with every
    image and caption encoded once."""
    import torch.nn.functional as F

    f_in, f_out = scorer.image_features(inputs), scorer.image_features(outputs)
    t_in, t_out = scorer.text_features(input_captions), scorer.text_features(output_captions)
    cols = {
        "clip_text_input": (f_in * t_in).sum(-1), "clip_text_output": (f_out * t_out).sum(-1),
        "clip_direction": F.cosine_similarity(f_out - f_in, t_out - t_in, dim=-1), "clip_image": (f_in * f_out).sum(-1),
    }
    return [{k: round(float(v[i]), 6) for k, v in cols.items()} for i in range(len(inputs))]
