"""Prompt-to-Prompt editing, from inversions of real images or from fresh noise.

Every path samples groups [source, target_1, ...], each group from its own shared x_T, with the
attention controller installed, and returns [source reconstruction, edit_1, ...] per group as
uint8 images. Many groups run as one batch (`edit_inverted_batch`): a benchmark or a dataset
generator pays for one UNet call per step, not one per edit.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from manip.prompts import read_prompts
from manip.sampling import Guidance, StepHook, Uncond, decode, denoise, encode_prompts, guides, initial_latents

from .attention import AttentionStore, controlled_attention
from .inversion import DirectInversionHook, Inversion, check_size, ddim_scheduler, native_size
from .p2p import P2PConfig, PromptToPrompt


def _p2p(pipe: StableDiffusionPipeline, x_T: torch.Tensor, groups: Sequence[Sequence[str]], uncond: Uncond,
         steps: int, guidance_scale: Guidance, configs: Sequence[P2PConfig], hooks: Sequence[StepHook],
         scale_initial: bool, record: AttentionStore | None = None) -> np.ndarray:
    """(G, n + 1, H, W, 3) images for G groups of n + 1 prompts; x_T is (G, C, h, w) and a tensor
    `guidance_scale` holds one scale per group. `record` receives the attention as edited, for
    heatmaps."""
    guided = uncond is not None and guides(guidance_scale)
    if record is not None and record.guided != guided:
        raise ValueError(f"record=AttentionStore(guided={record.guided}) but this edit is "
                         f"{'' if guided else 'not '}guided: the store would read the wrong half of the batch")
    # Alignments are built on the prompts as the encoder reads them (ё folded), or they would
    # count other tokens than the features they index.
    groups = [read_prompts(pipe.tokenizer, g) for g in groups]
    controller = PromptToPrompt(pipe.tokenizer, groups, steps, configs, guided=guided).to(pipe.unet.device)
    size = controller.group_size
    if torch.is_tensor(guidance_scale):
        guidance_scale = guidance_scale.repeat_interleave(size)
    cond = encode_prompts(pipe, [p for g in groups for p in g])
    latents = x_T.to(pipe.unet.device).repeat_interleave(size, 0)

    def hook(probs, call):
        probs = controller(probs, call)
        return record(probs, call) if record is not None else probs

    with controlled_attention(pipe.unet, hook):
        out = denoise(pipe, latents, cond, uncond, steps, guidance_scale, hooks=[*hooks, controller],
                      scale_initial=scale_initial, scheduler=ddim_scheduler(pipe))
    images = decode(pipe, out)
    return images.reshape(len(groups), size, *images.shape[1:])


def _sampler_settings(inv: Inversion) -> tuple:
    """What every inversion edited in one batch must share: method, step count, guidance scale
    and image size set the sampler and the latents every group runs through."""
    return inv.method, inv.steps, inv.guidance_scale, f"{inv.width}x{inv.height}"


def edit_inverted_batch(pipe: StableDiffusionPipeline, inversions: Sequence[Inversion],
                        targets: Sequence[Sequence[str]], configs: Sequence[P2PConfig],
                        record: AttentionStore | None = None) -> np.ndarray:
    """Edit many real images in one batch: inversion g with its target prompts `targets[g]` and
    `configs[g]`; (G, n + 1, H, W, 3), [g, 0] the reconstruction. The inversions must share
    `_sampler_settings`."""
    if not inversions or len(targets) != len(inversions) or len(configs) != len(inversions):
        raise ValueError(f"need one target list and one config per inversion, got {len(inversions)} inversions, "
                         f"{len(targets)} target lists, {len(configs)} configs")
    first = inversions[0]
    for inv in inversions:
        inv.check(pipe)
        if _sampler_settings(inv) != _sampler_settings(first):
            raise ValueError("inversions edited in one batch must share method, steps, guidance scale and image size "
                             f"(width x height): {_sampler_settings(inv)} vs {_sampler_settings(first)}")
    groups = [[inv.prompt, *t] for inv, t in zip(inversions, targets)]
    size = len(groups[0])
    device = pipe.unet.device
    uncond = [torch.stack([inv.uncond[i] for inv in inversions]).to(device).repeat_interleave(size, 0)
              for i in range(first.steps)]
    hooks = [DirectInversionHook(inversions, size)] if first.method == "direct" else []
    x_T = torch.cat([inv.x_T for inv in inversions])
    return _p2p(pipe, x_T, groups, uncond, first.steps, first.guidance_scale, configs, hooks, scale_initial=False,
                record=record)


def edit_inverted(pipe: StableDiffusionPipeline, inversion: Inversion, targets: Sequence[str],
                  config: P2PConfig = P2PConfig(), record: AttentionStore | None = None) -> np.ndarray:
    """Edit a real image through its inversion; image 0 is the reconstruction. `record`, if
    given, collects the cross-attention maps of [source, *targets] (see `heatmaps`)."""
    return edit_inverted_batch(pipe, [inversion], [list(targets)], [config], record)[0]


def edit_generated_batch(pipe: StableDiffusionPipeline, groups: Sequence[Sequence[str]],
                         generators: Sequence[torch.Generator], configs: Sequence[P2PConfig], steps: int = 50,
                         guidance_scale: Sequence[float] | float = 7.5, negative_prompt: str = "",
                         height: int | None = None, width: int | None = None,
                         record: AttentionStore | None = None) -> np.ndarray:
    """Many Prompt-to-Prompt samples in one batch: group g's prompts share the noise drawn from
    `generators[g]` and are guided with `guidance_scale[g]`; (G, n + 1, H, W, 3), at the model's
    native square unless `height` and `width` say otherwise. `record` receives the attention of
    every prompt, for heatmaps."""
    if len(generators) != len(groups):
        raise ValueError(f"need one generator per group, got {len(generators)} for {len(groups)} groups")
    check_size(pipe, height or native_size(pipe), width or native_size(pipe), "the sample")
    x_T = torch.cat([initial_latents(pipe, 1, g, height, width) for g in generators])
    scale = guidance_scale if isinstance(guidance_scale, float | int) else torch.tensor(list(guidance_scale))
    uncond = encode_prompts(pipe, [negative_prompt]) if guides(scale) else None
    return _p2p(pipe, x_T, groups, uncond, steps, scale, configs, (), scale_initial=True, record=record)


def edit_generated(pipe: StableDiffusionPipeline, prompts: Sequence[str], generator: torch.Generator,
                   config: P2PConfig = P2PConfig(), steps: int = 50, guidance_scale: float = 7.5,
                   negative_prompt: str = "", record: AttentionStore | None = None, height: int | None = None,
                   width: int | None = None) -> np.ndarray:
    """Prompt-to-Prompt on a generated image: all prompts share the noise drawn from `generator`
    (at the model's native square unless `height` and `width` say otherwise)."""
    return edit_generated_batch(pipe, [list(prompts)], [generator], [config], steps, guidance_scale, negative_prompt,
                                height, width, record)[0]
