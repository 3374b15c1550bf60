"""Scores of one edit of an EmojiWorld-Edit case against the generator's ground truth.

Scores are computed when finished edits are read, never stored with them: an edit costs
seconds to minutes of inversion, fine-tuning and sampling, its scores milliseconds, so a change
in what is measured (a metric, the judge's reading of an edit type, the CLIP or judge weights)
rescores every stored edit instead of recomputing it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from manip.metrics.image_quality import mse, psnr, ssim
from manip.metrics.judge import attribute_hits, predict
from manip.world.edits import Edit, render_edit

# Which attribute_hits entries say that the edited attribute matches the target scene. Adding
# and removing an object are judged like swapping one: every object the target asks for is in
# the picture (the one added, the one kept) and exactly the target's slots are occupied.
JUDGE_HITS: dict[str, tuple[str, ...]] = {
    "object": ("object", "position"), "colour": ("colour",), "background": ("background",),
    "time": ("time",), "style": ("style",), "add": ("object", "position"), "remove": ("object", "position"),
}


def region_crop(img: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The mask's bounding box cut out of `img` and resized back to the image size."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    crop = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return np.asarray(Image.fromarray(crop).resize((img.shape[1], img.shape[0]), Image.BICUBIC))


@dataclass
class EditScorer:
    """`renderer` draws each edit's source and ground truth, `clip` is a ClipScorer, `judge` an
    AttributeJudge."""

    renderer: object
    clip: object
    judge: object

    def __call__(self, edit: Edit, target_caption: str, recon: np.ndarray | None,
                 edited: np.ndarray) -> dict[str, float]:
        """Every score of `edited` (and of `recon`, the method's reconstruction of the source, None
        for a method that renders none), images at the renderer's size."""
        source, truth, mask = render_edit(self.renderer, edit)
        outside = ~mask
        crop = region_crop(edited, mask)
        feats = self.clip.image_features(np.stack([source, edited] + ([crop] if crop is not None else [])))
        text = self.clip.text_features([target_caption])[0]
        hits = attribute_hits(predict(self.judge, edited[None]), [edit.target])
        nan = float("nan")
        return {
            "recon_psnr": psnr(recon, source) if recon is not None else nan,
            "recon_ssim": ssim(recon, source) if recon is not None else nan,
            "bg_psnr": psnr(edited, source, outside), "bg_mse": mse(edited, source, outside),
            "bg_ssim": ssim(edited, source, outside),
            "gt_psnr_in": psnr(edited, truth, mask), "gt_psnr_out": psnr(edited, truth, outside),
            "clip_t": float(feats[1] @ text),
            "clip_t_region": float(feats[2] @ text) if crop is not None else nan,
            "structure_dist": float(1.0 - feats[0] @ feats[1]),
            "success": float(all(bool(hits[k][0]) for k in JUDGE_HITS[edit.kind])),
            "mask_fraction": float(mask.mean()),
        }
