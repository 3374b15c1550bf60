"""SVDiff (Han et al., 2023): train only shifts of the singular values of the UNet's weight
matrices, W = U diag(relu(sigma + delta)) V^T, with U, sigma, V from the base weights. The
artifact is the shifts alone (one value per singular value), a small fraction of what a
full or K/V fine-tune stores.

Several subjects train together with Cut-Mix-Unmix: pairs of reference images are cut in half
and joined ("A on the left and B on the right"), and an unmix term penalises each subject's
tokens for attending to the other subject's half in the cross-attention maps.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from manip.editing.attention import AttentionCall, controlled_attention

from .base import Customizer, FitConfig, LatentSet, encode_images, phrase_mask, template_language, tokenize
from .concept import Concept

WEIGHTS = "spectral_shifts.safetensors"


@dataclass(frozen=True)
class SVDiffConfig(FitConfig):
    lr: float = 1e-3
    cutmix_template: str = "{} on the left and {} on the right"  # first slot: the left half's subject
    cutmix_fraction: float = 0.5  # share of a multi-subject batch drawn from cut-mix images
    unmix_weight: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cutmix_template.count("{}") != 2:
            raise ValueError(f"SVDiffConfig.cutmix_template must hold two '{{}}', got {self.cutmix_template!r}")
        if not 0 <= self.cutmix_fraction <= 1 or self.unmix_weight < 0:
            raise ValueError("SVDiffConfig.cutmix_fraction must be in [0, 1] and unmix_weight >= 0")
        template_language(self.cutmix_template)  # one language, told now rather than at fit time


def spectral_layers(unet) -> dict[str, torch.nn.Module]:
    """Every linear and convolution layer of the UNet whose weight is a matrix or a kernel bank."""
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and min(m.weight.shape[:2]) > 1}


def _svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(weight.detach().flatten(1).double(), full_matrices=False)


class SpectralShift(torch.nn.Module):
    """A parametrization of a weight by shifts of its singular values."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        u, s, vh = _svd(weight)
        self.shape = weight.shape
        self.register_buffer("u", u.to(weight.dtype), persistent=False)
        self.register_buffer("s", s.to(weight.dtype), persistent=False)
        self.register_buffer("vh", vh.to(weight.dtype), persistent=False)
        self.delta = torch.nn.Parameter(torch.zeros_like(self.s))

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return shifted(self.u, self.s, self.vh, self.delta).reshape(self.shape)


def shifted(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (u * F.relu(s + delta)) @ vh


class SVDiff(Customizer):
    method = "svdiff"
    Config = SVDiffConfig
    config: SVDiffConfig

    def _prepare(self):
        self._mixed = self._cut_mix_set() if len(self.concepts) > 1 else None
        self._shifts = torch.nn.ModuleDict()
        for name, layer in spectral_layers(self.pipe.unet).items():
            shift = SpectralShift(layer.weight)
            parametrize.register_parametrization(layer, "weight", shift, unsafe=True)
            self._shifts[name.replace(".", "/")] = shift
        return self._shifts, list(self._shifts.parameters())

    def _finish(self) -> None:
        for layer in spectral_layers(self.pipe.unet).values():
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        self.pipe.unet.requires_grad_(False)

    def _cut_mix_phrases(self, left: Concept, right: Concept) -> tuple[str, str]:
        """The two subjects' phrases in the language of the Cut-Mix template."""
        language = template_language(self.config.cutmix_template)
        return self.phrase(left, language), self.phrase(right, language)

    def _cut_mix_set(self) -> LatentSet:
        """Every ordered pair of subjects, every pair of their references, cut and joined."""
        images, captions = [], []
        for a, b in itertools.permutations(self.concepts, 2):
            for left, right in itertools.product(a.images, b.images):
                images.append(cut_mix(left, right))
                captions.append(self.config.cutmix_template.format(*self._cut_mix_phrases(a, b)))
        return encode_images(self.pipe, np.stack(images), captions)

    def batch_loss(self, step: int, stream: int = 0):
        if self._mixed is None:
            return super().batch_loss(step, stream)
        cfg = self.config
        rng, gen = self.step_rng(step, stream)
        n_mixed = max(1, round(cfg.batch_size * cfg.cutmix_fraction))
        maps: list[torch.Tensor] = []

        def record(probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
            if call.is_cross:
                maps.append(probs)
            return probs

        with controlled_attention(self.pipe.unet, record):
            mixed, captions = self.data_loss(self._mixed, n_mixed, rng, gen)
        unmix = self._unmix_penalty(maps, captions)
        loss = mixed * n_mixed / cfg.batch_size + cfg.unmix_weight * unmix
        if n_mixed < cfg.batch_size:
            single, _ = self.data_loss(self._instance, cfg.batch_size - n_mixed, rng, gen)
            loss = loss + single * (cfg.batch_size - n_mixed) / cfg.batch_size
        loss, logs = self.with_prior(loss, rng, gen)
        return loss, {**logs, "unmix": unmix.item()}

    def _unmix_penalty(self, maps: list[torch.Tensor], captions: list[str]) -> torch.Tensor:
        """Mean attention mass each subject's tokens put on the other subject's half: the left
        subject's tokens on the right half, and the right subject's on the left half."""
        ids = tokenize(self.pipe, captions).cpu()
        total = torch.zeros((), device=self.pipe.unet.device)
        for a, b in itertools.permutations(self.concepts, 2):
            left, right = self._cut_mix_phrases(a, b)
            rows = [i for i, c in enumerate(captions) if c == self.config.cutmix_template.format(left, right)]
            if not rows:
                continue
            left_tokens = phrase_mask(self.pipe.tokenizer, ids[rows], left).to(total.device)
            right_tokens = phrase_mask(self.pipe.tokenizer, ids[rows], right).to(total.device)
            for probs in maps:  # (batch, heads, pixels, tokens)
                side = int(round(probs.shape[2] ** 0.5))
                right_half = (torch.arange(side, device=total.device).repeat(side) >= side // 2).float()
                mass = probs[rows].mean(1)
                total = total + torch.einsum("bpt,p,bt->b", mass, right_half, left_tokens).mean()
                total = total + torch.einsum("bpt,p,bt->b", mass, 1 - right_half, right_tokens).mean()
        return total / max(1, len(maps))

    def _save_artifact(self, directory: Path) -> None:
        save_file({name: shift.delta.detach().cpu().contiguous() for name, shift in self._shifts.items()},
                  str(directory / WEIGHTS))

    def _load_artifact(self, directory: Path) -> None:
        apply_shifts(self.pipe.unet, load_file(str(directory / WEIGHTS)))


@torch.no_grad()
def apply_shifts(unet, shifts: dict[str, torch.Tensor]) -> None:
    """Rebuild each shifted weight from the base weight's SVD, exactly as training computed it."""
    layers = spectral_layers(unet)
    unknown = sorted(set(shifts) - {n.replace(".", "/") for n in layers})
    if unknown:
        raise ValueError(f"spectral shifts name layers this UNet lacks, e.g. {unknown[0]}")
    for name, layer in layers.items():
        key = name.replace(".", "/")
        if key in shifts:
            u, s, vh = (x.to(layer.weight.dtype) for x in _svd(layer.weight))
            layer.weight.copy_(shifted(u, s, vh, shifts[key].to(layer.weight)).reshape(layer.weight.shape))


def cut_mix(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The left half of one image beside the right half of another."""
    half = left.shape[1] // 2
    return np.concatenate([left[:, :half], right[:, half:]], axis=1)

