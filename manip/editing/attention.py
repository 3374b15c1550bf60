"""Attention control through diffusers attention processors.

`controlled_attention(unet, hook)` installs a processor on every attention module of the UNet
by module path (`unet.attn_processors` names) and restores the original processors on exit,
so a pipeline samples exactly as before once an edit is done. The hook sees the attention
probabilities of every call as (batch, heads, queries, keys) and may return modified ones.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from diffusers.models.attention_processor import Attention


@dataclass(frozen=True)
class AttentionCall:
    name: str  # module path, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    is_cross: bool
    pixels: int  # query length: the number of latent pixels at this resolution


Hook = Callable[[torch.Tensor, AttentionCall], torch.Tensor]


class ControlledAttnProcessor:
    """diffusers' reference attention computation with a hook on the probabilities."""

    def __init__(self, name: str, hook: Hook):
        self.name = name
        self.hook = hook

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        batch, seq_len, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)
        heads = attn.heads
        shaped = probs.view(batch, heads, probs.shape[1], probs.shape[2])
        call = AttentionCall(self.name, is_cross, probs.shape[1])
        probs = self.hook(shaped, call).reshape(batch * heads, probs.shape[1], probs.shape[2])
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def controlled_attention(unet, hook: Hook) -> Iterator[None]:
    original = dict(unet.attn_processors)
    unet.set_attn_processor({name: ControlledAttnProcessor(name, hook) for name in original})
    try:
        yield
    finally:
        unet.set_attn_processor(original)


class AttentionStore:
    """Sums cross-attention maps per resolution over steps, heads and layers, for the
    conditional half of the batch; `maps()` returns their per-token averages."""

    def __init__(self, guided: bool):
        self.guided = guided
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if call.is_cross:
            cond = probs[probs.shape[0] // 2 :] if self.guided else probs
            m = cond.mean(1).detach()  # (batch, pixels, tokens)
            self._sums[call.pixels] = self._sums.get(call.pixels, 0) + m
            self._counts[call.pixels] = self._counts.get(call.pixels, 0) + 1
        return probs

    def maps(self, height: int, width: int) -> dict[tuple[int, int], torch.Tensor]:
        """{(h, w): (batch, h, w, tokens)} averaged maps at every resolution seen, for an image
        or latent of `height` x `width` (queries only count pixels: the aspect says how they lie)."""
        out = {}
        for pixels, total in self._sums.items():
            h, w = grid(pixels, height, width)
            avg = total / self._counts[pixels]
            out[h, w] = avg.reshape(avg.shape[0], h, w, avg.shape[-1])
        return out

    def token_map(self, height: int, width: int) -> torch.Tensor:
        """(batch, height, width, tokens): all resolutions upsampled to one size and averaged."""
        ups = [torch.nn.functional.interpolate(m.permute(0, 3, 1, 2), size=(height, width), mode="bilinear",
                                               align_corners=False) for m in self.maps(height, width).values()]
        return torch.stack(ups).mean(0).permute(0, 2, 3, 1)


def grid(pixels: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of an attention map with `pixels` queries over an image of `height` x `width`: the
    UNet divides both sides by one factor."""
    factor = math.sqrt(height * width / pixels)
    h, w = round(height / factor), round(width / factor)
    if h * w != pixels:
        raise ValueError(f"{pixels} attention queries do not tile a {width}x{height} (width x height) image: "
                         "both sides must be multiples of the UNet's total downsampling")
    return h, w
