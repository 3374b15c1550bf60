"""Prompt-to-Prompt controllers (Hertz et al., Algorithm 1): replace, refine, re-weight and
local blending, for one or many edit groups sampled in one batch.

A group is [source, target_1, ..., target_n] sampled from one shared x_T; a batch holds G such
groups of equal size, group after group, each with its own `P2PConfig`, so many unrelated edits
(a benchmark's cases, a dataset's caption pairs) share every UNet call. The conditional half of
a classifier-free-guided batch is edited; the unconditional half is left alone, as in the
reference implementation.

Every cross-attention edit is one formula, new = (source_maps @ M) * alpha + own_maps * (1 - alpha),
then times a per-token equalizer: replace is M = the word alignment with alpha = 1, refine a
one-hot M with alpha = 1 on the tokens both prompts share, re-weight M = I with alpha = 1, none
alpha = 0. That is what lets groups with different edit kinds run in one vectorised step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from .attention import AttentionCall, AttentionStore
from .tokens import equalizer, refine_mapper, replace_mapper, word_spans

EditKind = Literal["replace", "refine", "reweight", "none"]


@dataclass(frozen=True)
class P2PConfig:
    edit: EditKind = "replace"
    cross_replace: float = 0.8  # fraction of the steps, from the first, with injected cross-attention
    self_replace: float = 0.4  # likewise for self-attention (InstructPix2Pix draws p ~ U(0.1, 0.9))
    self_max_pixels: int | None = None  # inject self-attention only at resolutions up to this many pixels
    reweight: dict[str, float] = field(default_factory=dict)  # target-prompt word -> attention scale
    blend_words: tuple[Sequence[str], Sequence[str]] | None = None  # (source words, target words)
    blend_threshold: float = 0.3
    blend_start: float = 0.2  # fraction of the steps before local blending starts (reference: 0.2)

    def __post_init__(self) -> None:
        for name in ("cross_replace", "self_replace", "blend_threshold", "blend_start"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.edit not in ("replace", "refine", "reweight", "none"):
            raise ValueError(f"edit must be replace, refine, reweight or none, got {self.edit!r}")
        if self.self_max_pixels is not None and self.self_max_pixels < 1:
            raise ValueError(f"self_max_pixels must be >= 1 (or None for every layer), got {self.self_max_pixels}")
        if self.edit == "reweight" and not self.reweight:
            raise ValueError("a reweight edit needs at least one word in `reweight`")


def _cross_edit(tokenizer, source: str, target: str, config: P2PConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(M (K, K), alpha (K,)) of one target prompt in the unified cross-attention edit."""
    k = tokenizer.model_max_length
    if config.edit == "replace":
        return replace_mapper(tokenizer, source, target), torch.ones(k)
    if config.edit == "refine":
        index, alpha = refine_mapper(tokenizer, source, target)
        return F.one_hot(index, k).T.float(), alpha
    return torch.eye(k), torch.full((k,), 1.0 if config.edit == "reweight" else 0.0)


def _steps(fraction: float, steps: int) -> int:
    return int(round(fraction * steps))


def _check_groups(groups: Sequence[Sequence[str]], configs: Sequence[P2PConfig]) -> int:
    if not groups:
        raise ValueError("Prompt-to-Prompt needs at least one group of prompts")
    sizes = {len(g) for g in groups}
    if min(sizes) < 2:
        raise ValueError("Prompt-to-Prompt needs a source prompt and at least one target prompt")
    if len(sizes) != 1:
        raise ValueError(f"every group in a batch needs the same number of prompts, got sizes {sorted(sizes)}")
    if len(configs) != len(groups):
        raise ValueError(f"{len(configs)} configs for {len(groups)} groups")
    return sizes.pop()


class LocalBlend:
    """Keeps each group's targets on its source latents outside the region the edited words
    attend to. Maps are averaged over every step so far, as in the reference."""

    def __init__(self, tokenizer, groups: Sequence[Sequence[str]], configs: Sequence[P2PConfig], steps: int,
                 guided: bool):
        k, size = tokenizer.model_max_length, len(groups[0])
        self.group_size = size
        self.src_alpha = torch.zeros(len(groups), k)
        self.alphas = torch.zeros(len(groups), size - 1, k)
        self.active = torch.tensor([c.blend_words is not None for c in configs])
        self.threshold = torch.tensor([c.blend_threshold for c in configs])
        self.start = torch.tensor([_steps(c.blend_start, steps) for c in configs])
        for g, (prompts, config) in enumerate(zip(groups, configs)):
            if config.blend_words is None:
                continue
            src_words, tgt_words = config.blend_words
            src = word_spans(tokenizer, prompts[0])
            self.src_alpha[g, [i for w in src_words for i in src.tokens_of(w)]] = 1.0
            for j, p in enumerate(prompts[1:]):
                spans = word_spans(tokenizer, p)
                self.alphas[g, j, [i for w in tgt_words for i in spans.tokens_of(w)]] = 1.0
        self.store = AttentionStore(guided)

    def to(self, device: torch.device) -> "LocalBlend":
        for name in ("src_alpha", "alphas", "active", "threshold", "start"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        return self.store(probs, call)

    def masks(self, height: int, width: int) -> torch.Tensor:
        """(G, n_targets, 1, height, width) binary masks of the edited region; all ones for
        groups without blend words."""
        g, n = self.alphas.shape[:2]
        maps = self.store.token_map(height, width).reshape(g, n + 1, height, width, -1)
        src = (maps[:, 0] * self.src_alpha[:, None, None, :]).sum(-1)  # (G, h, w)
        tgt = (maps[:, 1:] * self.alphas[:, :, None, None, :]).sum(-1)  # (G, n, h, w)
        m = torch.maximum(tgt, src[:, None]).reshape(g * n, 1, height, width)
        m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = m / m.flatten(1).amax(1).clamp_min(1e-8)[:, None, None, None]
        m = m.reshape(g, n, 1, height, width)
        inside = m > self.threshold[:, None, None, None, None]
        return (inside | ~self.active[:, None, None, None, None]).to(m.dtype)

    def end_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        blending = self.active & (step >= self.start)
        if not blending.any():
            return latents
        size = self.group_size
        grouped = latents.reshape(-1, size, *latents.shape[1:])
        src, tgt = grouped[:, :1], grouped[:, 1:]
        keep = self.masks(*latents.shape[-2:]).bool() | ~blending[:, None, None, None, None]
        out = torch.cat([src, torch.where(keep, tgt, src)], 1)
        return out.reshape(latents.shape)


class PromptToPrompt:
    """Attention hook for G groups of [source, target_1, ..., target_n]; `prompts` is one group
    or a list of groups, `config` one config for all or one per group."""

    def __init__(self, tokenizer, prompts: Sequence[str] | Sequence[Sequence[str]], steps: int,
                 config: P2PConfig | Sequence[P2PConfig], guided: bool):
        groups = [list(prompts)] if prompts and isinstance(prompts[0], str) else [list(g) for g in prompts]
        configs = [config] * len(groups) if isinstance(config, P2PConfig) else list(config)
        self.group_size = _check_groups(groups, configs)
        self.guided, self.step = guided, 0
        self.cross_steps = torch.tensor([_steps(c.cross_replace, steps) for c in configs])
        self.self_steps = torch.tensor([_steps(c.self_replace, steps) for c in configs])
        self.self_max_pixels = torch.tensor([c.self_max_pixels if c.self_max_pixels is not None else 2**62
                                             for c in configs])
        edits = [[_cross_edit(tokenizer, g[0], t, c) for t in g[1:]] for g, c in zip(groups, configs)]
        self.mapper = torch.stack([torch.stack([m for m, _ in e]) for e in edits])  # (G, n, K, K)
        self.alpha = torch.stack([torch.stack([a for _, a in e]) for e in edits])  # (G, n, K)
        self.equalizer = torch.stack([torch.stack([equalizer(tokenizer, t, c.reweight) if c.reweight
                                                   else torch.ones(tokenizer.model_max_length) for t in g[1:]])
                                      for g, c in zip(groups, configs)])  # (G, n, K)
        self.blend = (LocalBlend(tokenizer, groups, configs, steps, guided)
                      if any(c.blend_words is not None for c in configs) else None)

    def to(self, device: torch.device) -> "PromptToPrompt":
        """The per-group schedules and token maps, built on the CPU, moved to the UNet's device."""
        for name in ("cross_steps", "self_steps", "self_max_pixels", "mapper", "alpha", "equalizer"):
            setattr(self, name, getattr(self, name).to(device))
        if self.blend:
            self.blend.to(device)
        return self

    def begin_step(self, step: int) -> None:
        self.step = step

    def end_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        return self.blend.end_step(step, latents) if self.blend else latents

    def _cross(self, base: torch.Tensor, edit: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        dtype = base.dtype
        mapped = torch.einsum("ghqs,gnst->gnhqt", base, self.mapper.to(dtype))
        a = self.alpha.to(dtype)[:, :, None, None, :]
        new = (mapped * a + edit * (1 - a)) * self.equalizer.to(dtype)[:, :, None, None, :]
        return torch.where(active[:, None, None, None, None], new, edit)

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if self.blend:
            self.blend(probs, call)
        if call.is_cross:
            active = self.step < self.cross_steps
        else:
            active = (self.step < self.self_steps) & (call.pixels <= self.self_max_pixels)
        if not active.any():
            return probs
        half = probs.shape[0] // 2 if self.guided else 0
        cond = probs[half:].reshape(-1, self.group_size, *probs.shape[1:])
        base, edit = cond[:, 0], cond[:, 1:]
        if call.is_cross:
            new = self._cross(base, edit, active)
        else:
            new = torch.where(active[:, None, None, None, None], base[:, None].expand_as(edit), edit)
        return torch.cat([probs[:half], torch.cat([base[:, None], new], 1).reshape(-1, *probs.shape[1:])])
