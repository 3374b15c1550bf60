"""CLIP-based scores over any local CLIP checkpoint (the embedded evaluator or a real one).

CLIP-T (image-text), CLIP-I (image-image) and the InstructPix2Pix directional similarity
(cosine of the image-feature change with the caption-feature change).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, CLIPModel


def projected(out) -> torch.Tensor:
    """Projected CLIP features: transformers 5 returns them as `pooler_output` of an output
    object, earlier releases as a bare tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


class ClipScorer:
    def __init__(self, path: str | Path, batch_size: int = 128, device: torch.device | str = "cpu"):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP checkpoint at {path}: build it with `dvc repro evaluator` "
                                    "or pass the folder of a local CLIP model")
        self.model = CLIPModel.from_pretrained(path).eval().to(device)
        self.processor = AutoProcessor.from_pretrained(path)
        self.batch_size = batch_size

    @torch.inference_mode()
    def image_features(self, images: np.ndarray) -> torch.Tensor:
        """Unit-norm features of uint8 NHWC images."""
        feats = []
        for i in range(0, len(images), self.batch_size):
            batch = [np.asarray(im) for im in images[i : i + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt").pixel_values.to(self.model.device)
            feats.append(projected(self.model.get_image_features(pixel_values=pixels)).cpu())
        return F.normalize(torch.cat(feats).float(), dim=-1)

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        feats = []
        for i in range(0, len(texts), self.batch_size):
            ids = self.processor(text=list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                 return_tensors="pt")
            ids = ids.to(self.model.device)
            feats.append(projected(self.model.get_text_features(input_ids=ids.input_ids,
                                                             attention_mask=ids.attention_mask)).cpu())
        return F.normalize(torch.cat(feats).float(), dim=-1)

    def clip_t(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        return (self.image_features(images) * self.text_features(texts)).sum(-1).numpy()

    def clip_i(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (self.image_features(a) * self.image_features(b)).sum(-1).numpy()

    def directional(self, src_images: np.ndarray, tgt_images: np.ndarray, src_texts: Sequence[str],
                    tgt_texts: Sequence[str]) -> np.ndarray:
        d_img = self.image_features(tgt_images) - self.image_features(src_images)
        d_txt = self.text_features(tgt_texts) - self.text_features(src_texts)
        return F.cosine_similarity(d_img, d_txt, dim=-1).numpy()
