"""Per-word or per-token cross-attention heatmaps: where each word (or each token, as the
reference notebooks show them) of each prompt looked while sampling.

Maps come from an `AttentionStore` (every resolution, averaged over steps, layers and heads,
upsampled to one size and averaged); a word's map is the sum over its tokens. Rendered as one
row per prompt: the image, then each unit's map over a grey copy of it, labelled.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .attention import AttentionStore
from .tokens import word_spans

LABEL_HEIGHT = 12
Unit = Literal["word", "token"]


def _units(tokenizer, prompt: str, unit: Unit) -> list[tuple[str, tuple[int, int]]]:
    """(label, token span) of every word, or of every token between the start and end tokens."""
    if unit == "word":
        spans = word_spans(tokenizer, prompt)
        return list(zip(spans.words, spans.spans))
    if unit == "token":
        ids = tokenizer(prompt).input_ids[1:-1]
        return [(tokenizer.decode([t]).strip() or "?", (i + 1, i + 2)) for i, t in enumerate(ids)]
    raise ValueError(f"heatmaps are per word or per token, got {unit!r}")


def word_maps(store: AttentionStore, tokenizer, prompts: Sequence[str], height: int, width: int,
              unit: Unit = "word") -> list[list[tuple[str, np.ndarray]]]:
    """For each prompt, (label, map in [0, 1] of shape (height, width)) for every word or token, in order."""
    maps = store.token_map(height, width).cpu().numpy()  # (batch, height, width, K)
    if len(maps) != len(prompts):
        raise ValueError(f"the store holds maps of {len(maps)} prompts, got {len(prompts)} prompts")
    out = []
    for m, prompt in zip(maps, prompts):
        row = []
        for label, (a, b) in _units(tokenizer, prompt, unit):
            w = m[:, :, a:b].sum(-1)
            w = (w - w.min()) / max(float(w.max() - w.min()), 1e-8)
            row.append((label, w))
        out.append(row)
    return out


def _overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    grey = image.astype(np.float32).mean(-1, keepdims=True).repeat(3, -1) * 0.5
    red = np.zeros_like(grey)
    red[..., 0], red[..., 1] = 255.0, 64.0
    a = heat[..., None]
    return (grey * (1 - a) + red * a).clip(0, 255).astype(np.uint8)


def render_heatmaps(store: AttentionStore, tokenizer, prompts: Sequence[str], images: np.ndarray,
                    scale: int = 2, unit: Unit = "word") -> Image.Image:
    """One row per prompt: its image (uint8 HxWx3), then one labelled heatmap per word or token."""
    height, width = images.shape[1:3]
    rows = word_maps(store, tokenizer, prompts, height, width, unit)
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
