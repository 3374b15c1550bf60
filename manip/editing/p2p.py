"""Prompt-to-Prompt controllers (Hertz et al., Algorithm 1): replace, refine, re-weight and
local blending, for a batch [source, target_1, ..., target_n] sampled from shared noise.

The conditional half of a classifier-free-guided batch is edited; the unconditional half is
left alone, as in the reference implementation.
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

    def __post_init__(self) -> None:
        for name in ("cross_replace", "self_replace", "blend_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.edit not in ("replace", "refine", "reweight", "none"):
            raise ValueError(f"edit must be replace, refine, reweight or none, got {self.edit!r}")
        if self.edit == "reweight" and not self.reweight:
            raise ValueError("a reweight edit needs at least one word in `reweight`")


class LocalBlend:
    """Keeps the source latents outside the region the edited words attend to."""

    def __init__(self, tokenizer, prompts: Sequence[str], words: tuple[Sequence[str], Sequence[str]],
                 threshold: float, guided: bool):
        k = tokenizer.model_max_length
        self.alphas = torch.zeros(len(prompts) - 1, k)
        src = word_spans(tokenizer, prompts[0])
        src_tokens = [i for w in words[0] for i in src.tokens_of(w)]
        self.src_alpha = torch.zeros(k)
        self.src_alpha[src_tokens] = 1.0
        for j, p in enumerate(prompts[1:]):
            spans = word_spans(tokenizer, p)
            self.alphas[j, [i for w in words[1] for i in spans.tokens_of(w)]] = 1.0
        self.threshold = threshold
        self.guided = guided
        self.store = AttentionStore(guided)

    def begin_step(self, step: int) -> None:
        self.store = AttentionStore(self.guided)

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        return self.store(probs, call)

    def masks(self, size: int) -> torch.Tensor:
        """(n_targets, 1, size, size) binary masks of the edited region."""
        maps = self.store.token_map(size)  # (n, size, size, K)
        src = (maps[0] * self.src_alpha).sum(-1)
        tgt = (maps[1:] * self.alphas[:, None, None, :]).sum(-1)
        m = torch.maximum(tgt, src[None])[:, None]
        m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = m / m.flatten(1).amax(1).clamp_min(1e-8)[:, None, None, None]
        return (m > self.threshold).to(m.dtype)

    def end_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        mask = self.masks(latents.shape[-1])
        src = latents[:1]
        return torch.cat([src, src + mask * (latents[1:] - src)])


class PromptToPrompt:
    """Attention hook for one source prompt and any number of target prompts."""

    def __init__(self, tokenizer, prompts: Sequence[str], steps: int, config: P2PConfig, guided: bool):
        if len(prompts) < 2:
            raise ValueError("Prompt-to-Prompt needs a source prompt and at least one target prompt")
        self.config, self.guided, self.step = config, guided, 0
        self.cross_steps = int(round(config.cross_replace * steps))
        self.self_steps = int(round(config.self_replace * steps))
        src, targets = prompts[0], list(prompts[1:])
        self.mapper = self.index = self.alpha = None
        if config.edit == "replace":
            self.mapper = torch.stack([replace_mapper(tokenizer, src, t) for t in targets])
        elif config.edit == "refine":
            pairs = [refine_mapper(tokenizer, src, t) for t in targets]
            self.index = torch.stack([p[0] for p in pairs])
            self.alpha = torch.stack([p[1] for p in pairs])
        self.equalizer = (torch.stack([equalizer(tokenizer, t, config.reweight) for t in targets])
                          if config.reweight else None)
        self.blend = (LocalBlend(tokenizer, prompts, config.blend_words, config.blend_threshold, guided)
                      if config.blend_words else None)

    def begin_step(self, step: int) -> None:
        self.step = step
        if self.blend:
            self.blend.begin_step(step)

    def end_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        return self.blend.end_step(step, latents) if self.blend else latents

    def _cross(self, base: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        if self.step >= self.cross_steps:
            return edit
        if self.mapper is not None:
            new = torch.einsum("hqs,nst->nhqt", base, self.mapper.to(base.dtype))
        elif self.index is not None:
            taken = base[:, :, self.index].permute(2, 0, 1, 3)  # (n, heads, q, K)
            a = self.alpha.to(base.dtype)[:, None, None, :]
            new = taken * a + edit * (1 - a)
        elif self.config.edit == "reweight":
            new = base.expand_as(edit)
        else:
            new = edit
        if self.equalizer is not None:
            new = new * self.equalizer.to(base.dtype)[:, None, None, :]
        return new

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if self.blend:
            self.blend(probs, call)
        half = probs.shape[0] // 2 if self.guided else 0
        cond = probs[half:]
        base, edit = cond[0], cond[1:]
        if call.is_cross:
            new = self._cross(base, edit)
        elif self.step < self.self_steps and (self.config.self_max_pixels is None
                                             or call.pixels <= self.config.self_max_pixels):
            new = base.expand_as(edit)
        else:
            return probs
        return torch.cat([probs[:half], base[None], new])
