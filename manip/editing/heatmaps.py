"""Per-word cross-attention heatmaps: where each word of each prompt looked while sampling.

Maps come from an `AttentionStore` (every resolution, averaged over steps, layers and heads,
upsampled to one size and averaged); a word's map is the sum over its tokens. Rendered as one
row per prompt: the image, then each word's map over a grey copy of it, labelled.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .attention import AttentionStore
from .tokens import word_spans

LABEL_HEIGHT = 12


def word_maps(store: AttentionStore, tokenizer, prompts: Sequence[str], height: int,
              width: int) -> list[list[tuple[str, np.ndarray]]]:
    """For each prompt, (word, map in [0, 1] of shape (height, width)) for every word, in order."""
    maps = store.token_map(height, width).cpu().numpy()  # (batch, height, width, K)
    if len(maps) != len(prompts):
        raise ValueError(f"the store holds maps of {len(maps)} prompts, got {len(prompts)} prompts")
    out = []
    for m, prompt in zip(maps, prompts):
        spans = word_spans(tokenizer, prompt)
        row = []
        for word, (a, b) in zip(spans.words, spans.spans):
            w = m[:, :, a:b].sum(-1)
            w = (w - w.min()) / max(float(w.max() - w.min()), 1e-8)
            row.append((word, w))
        out.append(row)
    return out


def _overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    grey = image.astype(np.float32).mean(-1, keepdims=True).repeat(3, -1) * 0.5
    red = np.zeros_like(grey)
    red[..., 0], red[..., 1] = 255.0, 64.0
    a = heat[..., None]
    return (grey * (1 - a) + red * a).clip(0, 255).astype(np.uint8)


def render_heatmaps(store: AttentionStore, tokenizer, prompts: Sequence[str], images: np.ndarray,
                    scale: int = 2) -> Image.Image:
    """One row per prompt: its image (uint8 HxWx3), then one labelled heatmap per word."""
    height, width = images.shape[1:3]
    rows = word_maps(store, tokenizer, prompts, height, width)
    cell_h, cell_w = height * scale, width * scale
    canvas = Image.new("RGB", (cell_w * (1 + max(len(r) for r in rows)), (cell_h + LABEL_HEIGHT) * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (row, image) in enumerate(zip(rows, images)):
        y = i * (cell_h + LABEL_HEIGHT)
        tiles = [("image", image)] + [(word, _overlay(image, heat)) for word, heat in row]
        for j, (label, tile) in enumerate(tiles):
            canvas.paste(Image.fromarray(tile).resize((cell_w, cell_h), Image.NEAREST), (j * cell_w, y))
            draw.text((j * cell_w + 2, y + cell_h), label[: max(1, cell_w // 6)], fill="black")
    return canvas
