"""Inversions of a real image into the diffusion model's noise, as reusable artifacts.

- DDIM inversion: the deterministic ODE run backwards with the source prompt.
- Null-text inversion (Mokady et al.): per-step unconditional embeddings optimised so that
  guided sampling retraces the DDIM trajectory.
- Negative-prompt inversion: the source prompt's embedding as the unconditional context; no
  optimisation at all.
- Direct inversion (PnP-inversion style): plain DDIM inversion plus, at sampling time, pinning the
  source branch to the inversion trajectory (see `DirectInversionHook`).

An `Inversion` holds the latent trajectory and per-step unconditional contexts plus metadata
naming the model and resolution, so one inversion serves many edits and is refused by another
model.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from manip.prompts import read_prompts
from manip.sampling import encode_prompts
from manip.training.checkpoint import recover_dir, replace_dir, staging_dir

Method = Literal["ddim", "null-text", "negative-prompt", "direct"]
METHODS: tuple[str, ...] = ("ddim", "null-text", "negative-prompt", "direct")


class InversionMismatch(ValueError):
    """An inversion artifact used with a model or size it was not made with."""


_BOOKKEEPING = ("transformers_version", "architectures", "dtype", "torch_dtype")


def _architecture(config: dict) -> dict:
    """A config without bookkeeping keys: `_name_or_path` (where it was loaded from), library
    versions, and what `save_pretrained` adds (`architectures`, `dtype`), any of which would make
    one model look like another once moved, saved or reloaded. The dtype still counts: it is in
    the weight digest."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in _BOOKKEEPING}


def model_id(pipe: StableDiffusionPipeline) -> str:
    """Identity of the denoiser + text encoder + VAE: configs, and a digest of the first values
    of every weight tensor (cheap even for full-size SD, and it sees a fine-tune or a swapped text
    encoder that leaves the UNet's outer convolutions alone)."""
    h = hashlib.sha256()
    for comp in (pipe.unet, pipe.vae):
        h.update(json.dumps(_architecture(dict(comp.config)), sort_keys=True, default=str).encode())
    h.update(json.dumps(_architecture(pipe.text_encoder.config.to_dict()), sort_keys=True, default=str).encode())
    for comp in (pipe.unet, pipe.vae, pipe.text_encoder):
        for name, w in comp.named_parameters():
            h.update(name.encode())
            h.update(w.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def ddim_scheduler(pipe: StableDiffusionPipeline) -> DDIMScheduler:
    """The pipeline's noise schedule as a deterministic DDIM sampler (eta = 0). Clipping and
    thresholding of the predicted x_0 are off whatever the config says (DDIMScheduler defaults to
    clip_sample=True when converted from a config without the key): the inversion never clips, so
    a clipping sampler would not retrace it."""
    return DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, thresholding=False)


def _alpha(scheduler: DDIMScheduler, t: int) -> torch.Tensor:
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def to_eps(out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Model output of any prediction type -> predicted noise."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return alpha.sqrt() * out + (1 - alpha).sqrt() * x
    if prediction_type == "sample":
        return (x - alpha.sqrt() * out) / (1 - alpha).sqrt()
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def ddim_jump(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


@dataclass
class Inversion:
    method: str
    prompt: str
    steps: int
    guidance_scale: float
    trajectory: torch.Tensor  # (steps + 1, C, h, w): [0] is the clean latent, [steps] is x_T
    uncond: torch.Tensor  # (steps, K, D) unconditional context for each sampling step
    model: str  # model_id of the pipeline it was made with
    height: int  # image size in pixels
    width: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    image_digest: str = ""  # `image_digest` of the inverted pixels: a reuse proves it edits the same image

    @property
    def x_T(self) -> torch.Tensor:
        return self.trajectory[-1:]

    def check(self, pipe: StableDiffusionPipeline, height: int | None = None, width: int | None = None) -> None:
        mid = model_id(pipe)
        if mid != self.model:
            raise InversionMismatch(f"inversion was made with model {self.model}, this pipeline is {mid}")
        asked = (height or self.height, width or self.width)
        if asked != (self.height, self.width):
            raise InversionMismatch(f"inversion is for {self.width}x{self.height} (width x height) images, asked "
                                    f"for {asked[1]}x{asked[0]}")

    def save(self, directory: str | Path) -> None:
        final = Path(directory)
        tmp = staging_dir(final)
        save_file({"trajectory": self.trajectory.contiguous(), "uncond": self.uncond.contiguous()},
                  str(tmp / "inversion.safetensors"))
        meta = {k: getattr(self, k) for k in ("method", "prompt", "steps", "guidance_scale", "model", "height",
                                               "width", "seconds", "notes", "image_digest")}
        (tmp / "inversion.json").write_text(json.dumps(meta, indent=1))
        replace_dir(tmp, final)

    @classmethod
    def load(cls, directory: str | Path, pipe: StableDiffusionPipeline | None = None) -> "Inversion":
        directory = Path(directory)
        recover_dir(directory)
        if not (directory / "inversion.json").is_file():
            raise FileNotFoundError(f"no inversion artifact at {directory} (expected inversion.json)")
        try:
            meta = json.loads((directory / "inversion.json").read_text())
            if "size" in meta:  # artifacts from before non-square images: one side for both
                side = meta.pop("size")
                meta.update(height=side, width=side)
            tensors = load_file(str(directory / "inversion.safetensors"))
            inv = cls(trajectory=tensors["trajectory"], uncond=tensors["uncond"], **meta)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise ValueError(f"{directory} is not a readable inversion artifact: {err}") from None
        if len(inv.trajectory) != inv.steps + 1 or len(inv.uncond) != inv.steps:
            raise ValueError(f"{directory} is not a readable inversion artifact: {inv.steps} steps need "
                             f"{inv.steps + 1} trajectory latents and {inv.steps} contexts, it holds "
                             f"{len(inv.trajectory)} and {len(inv.uncond)}")
        if pipe is not None:
            inv.check(pipe)
        return inv


def image_digest(image: np.ndarray) -> str:
    """Identity of uint8 pixels and their shape; exact where re-encoding the image would compare
    latents up to the device's float rounding."""
    arr = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()[:16]


@torch.no_grad()
def encode_image(pipe: StableDiffusionPipeline, image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 image, or NxHxWx3 batch -> scaled latents (N, C, h, w)."""
    arr = np.array(image, dtype=np.float32)
    x = torch.from_numpy(arr[None] if arr.ndim == 3 else arr).permute(0, 3, 1, 2) / 127.5 - 1
    return pipe.vae.encode(x.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mode() * pipe.vae.config.scaling_factor


@torch.no_grad()
def ddim_trajectory(pipe: StableDiffusionPipeline, z0: torch.Tensor, cond: torch.Tensor, steps: int,
                    scheduler: DDIMScheduler) -> torch.Tensor:
    """z_0 -> z_T with the conditional prediction only (guidance 1), as in null-text inversion;
    (steps + 1, B, C, h, w) for a batch of B latents."""
    scheduler.set_timesteps(steps)
    stride = scheduler.config.num_train_timesteps // steps
    ptype = scheduler.config.prediction_type
    traj, x = [z0], z0
    for t in reversed(scheduler.timesteps.tolist()):
        a_t = _alpha(scheduler, t)
        eps = to_eps(pipe.unet(x, t, encoder_hidden_states=cond).sample, x, a_t, ptype)
        x = ddim_jump(x, eps, _alpha(scheduler, t - stride), a_t)
        traj.append(x)
    return torch.stack(traj)


def _guided_eps(pipe, x, t, cond_eps, uncond, guidance, a_t, ptype) -> torch.Tensor:
    u = to_eps(pipe.unet(x, t, encoder_hidden_states=uncond).sample, x, a_t, ptype)
    return u + guidance * (cond_eps - u)


def null_text_optimise(pipe: StableDiffusionPipeline, trajectory: torch.Tensor, cond: torch.Tensor,
                       uncond: torch.Tensor, steps: int, guidance: float, scheduler: DDIMScheduler,
                       inner_steps: int = 10, lr: float = 1e-2, early_stop: float = 1e-5,
                       progress: bool = False) -> torch.Tensor:
    """Per-step null-text embeddings, (steps, B, K, D) for a batch of B trajectories (reference
    defaults: 10 Adam steps at lr 1e-2 * (1 - i/100), early stop at 1e-5 + i * 2e-5).

    Each image's embedding sees only its own loss (the batch loss is a sum of per-image means,
    and Adam is element-wise), and an image that reaches the early-stop level keeps the value it
    stopped at while the others go on: a batch gives every image what a run on its own would.
    An image stops with the embedding whose loss met the level (the reference takes one more
    Adam step past it), so the forward that measured that loss also gave its next latent: a
    step that stops costs no backward and no extra forward.
    Only the embedding takes gradients: the model's weights are frozen, so backward skips every
    weight gradient."""
    scheduler.set_timesteps(steps)
    stride = scheduler.config.num_train_timesteps // steps
    ptype = scheduler.config.prediction_type
    frozen = [p for p in pipe.unet.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    x = trajectory[-1]
    out, u = [], uncond.detach().expand(len(x), *uncond.shape[-2:]).clone()
    try:
        for i, t in enumerate(tqdm(scheduler.timesteps.tolist(), disable=not progress, desc="null-text")):
            a_t, a_prev = _alpha(scheduler, t), _alpha(scheduler, t - stride)
            target = trajectory[steps - i - 1]
            with torch.no_grad():
                cond_eps = to_eps(pipe.unet(x, t, encoder_hidden_states=cond).sample, x, a_t, ptype)
            u = u.detach().clone().requires_grad_(True)  # Adam updates in place: a fresh tensor per step
            # The reference's 1 - i/100 decay, stretched past 50 steps so that it never goes
            # negative (Adam refuses a negative rate: null-text with > 101 steps used to crash).
            opt = torch.optim.Adam([u], lr=lr * (1.0 - i / max(100, 2 * steps)))
            running = torch.ones(len(x), dtype=torch.bool, device=x.device)
            x_next = torch.empty_like(x)
            for _ in range(inner_steps):
                x_prev = ddim_jump(x, _guided_eps(pipe, x, t, cond_eps, u, guidance, a_t, ptype), a_t, a_prev)
                losses = (x_prev - target).pow(2).flatten(1).mean(1)
                stopped = running & (losses.detach() < early_stop + i * 2e-5)
                # A stopped image's embedding is the one this forward used, so its next latent
                # is this forward's result: no extra forward, no backward that would be undone.
                x_next[stopped] = x_prev.detach()[stopped]
                running &= ~stopped
                if not running.any():
                    break
                opt.zero_grad(set_to_none=True)
                losses[running].sum().backward()
                before = u.detach().clone()
                opt.step()
                with torch.no_grad():
                    u[~running] = before[~running]
            u = u.detach()
            out.append(u)
            if running.any():  # the images still optimising took a step after their last forward
                with torch.no_grad():
                    eps = _guided_eps(pipe, x[running], t, cond_eps[running], u[running], guidance, a_t, ptype)
                    x_next[running] = ddim_jump(x[running], eps, a_t, a_prev)
            x = x_next
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return torch.stack(out)


def native_size(pipe: StableDiffusionPipeline) -> int:
    """The image side the model was trained at, in pixels: the size an edit works at unless told."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def size_multiple(pipe: StableDiffusionPipeline) -> int:
    """Pixels per latent pixel at the UNet's coarsest resolution: an image side must be a
    multiple of this for every attention map to tile the image."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)


# The largest working size, in multiples of the model's native pixel count: past it the attention
# maps and activations grow quadratically into an out-of-memory failure, and SD models draw
# repeated content anyway.
MAX_WORK_SCALE = 4


def check_size(pipe: StableDiffusionPipeline, height: int, width: int, what: str = "the image") -> None:
    """Refuse a size some attention map would not tile: the UNet rounds an odd side up when it
    halves it, so maps are read as grids only when both sides are multiples of `size_multiple`."""
    native = native_size(pipe)
    if height * width > MAX_WORK_SCALE * native * native:
        raise ValueError(f"{what}: its size {width}x{height} (width x height) is over {MAX_WORK_SCALE} times the "
                         f"pixels of the model's native {native}x{native}: work at a smaller size")
    stride = size_multiple(pipe)
    if height % stride or width % stride:
        fit_h, fit_w = (max(stride, round(v / stride) * stride) for v in (height, width))
        raise ValueError(f"{what}: its size {width}x{height} (width x height) must be a multiple of {stride} on both "
                         f"sides for this model, e.g. {fit_w}x{fit_h}")


def check_images(pipe: StableDiffusionPipeline, images: Sequence[np.ndarray]) -> None:
    """Images the model can invert as one batch: uint8 RGB, all one size, a size `check_size`
    accepts. Any file becomes one with `manip.editing.images.load_image`."""
    shapes = set()
    for i, image in enumerate(images):
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"image {i}: need a uint8 HxWx3 RGB array, got {arr.dtype} {arr.shape} "
                             "(manip.editing.images.load_image makes one from any image file)")
        check_size(pipe, arr.shape[0], arr.shape[1], f"image {i}")
        shapes.add(arr.shape[:2])
    if len(shapes) > 1:
        raise ValueError("images inverted in one batch must share a size, got "
                         f"{', '.join(f'{w}x{h}' for h, w in sorted(shapes))} (width x height)")


def invert_batch(pipe: StableDiffusionPipeline, images: Sequence[np.ndarray], prompts: Sequence[str],
                 method: Method = "null-text", steps: int = 50, guidance_scale: float = 7.5, inner_steps: int = 10,
                 progress: bool = False, lr: float = 1e-2) -> list[Inversion]:
    """Invert each image (uint8 HxWx3, any size `check_images` accepts, all the same size) under its
    prompt, all in one batch; each artifact records the batch's seconds per image.

    `lr` is null-text's initial Adam rate (the reference's 1e-2). A higher rate reaches the
    early-stop level in fewer inner steps: 3e-2 needs about half the backward passes and
    reconstructs as well on the embedded model (README, editing speed)."""
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; known: {METHODS}")
    if len(images) != len(prompts) or not images:
        raise ValueError(f"need one prompt per image and at least one image, got {len(images)} images "
                         f"and {len(prompts)} prompts")
    scheduler = ddim_scheduler(pipe)
    n_train = scheduler.config.num_train_timesteps
    if not 1 <= steps <= n_train:  # 0 would divide by zero below, more than n_train repeat timesteps
        raise ValueError(f"steps must be between 1 and {n_train}, got {steps}")
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    if not lr > 0:
        raise ValueError(f"the null-text learning rate must be > 0, got {lr}")
    check_images(pipe, images)
    if any(not p.strip() for p in prompts):
        raise ValueError("prompts must not be empty: an inversion reconstructs the image under its caption")
    started = time.perf_counter()
    prompts = read_prompts(pipe.tokenizer, prompts)  # stored as the encoder read them, so edits align
    cond = encode_prompts(pipe, prompts)
    z0 = encode_image(pipe, np.stack(images))
    trajectory = ddim_trajectory(pipe, z0, cond, steps, scheduler)
    if method == "null-text":
        uncond = null_text_optimise(pipe, trajectory, cond, encode_prompts(pipe, [""]), steps, guidance_scale,
                                    scheduler, inner_steps=inner_steps, lr=lr, progress=progress)
    elif method == "negative-prompt":
        uncond = cond.expand(steps, *cond.shape).clone()
    else:
        uncond = encode_prompts(pipe, [""]).expand(steps, len(images), *cond.shape[1:]).clone()
    seconds = round((time.perf_counter() - started) / len(images), 3)
    mid = model_id(pipe)
    return [Inversion(method=method, prompt=p, steps=steps, guidance_scale=guidance_scale,
                      trajectory=trajectory[:, b].cpu().contiguous(), uncond=uncond[:, b].cpu().contiguous(), model=mid,
                      height=images[b].shape[0], width=images[b].shape[1], seconds=seconds,
                      image_digest=image_digest(images[b]))
            for b, p in enumerate(prompts)]


def invert(pipe: StableDiffusionPipeline, image: np.ndarray, prompt: str, method: Method = "null-text",
           steps: int = 50, guidance_scale: float = 7.5, inner_steps: int = 10, progress: bool = False,
           lr: float = 1e-2) -> Inversion:
    """Invert `image` (uint8 HxWx3, any size `check_images` accepts) under `prompt`."""
    return invert_batch(pipe, [image], [prompt], method, steps, guidance_scale, inner_steps, progress, lr)[0]


class DirectInversionHook:
    """Direct inversion: after every step each group's source branch (the first of every
    `group_size` batch items) is set back onto its inversion trajectory, so the source
    reconstruction is exact and the targets are edited from the true latents."""

    def __init__(self, inversions: Sequence[Inversion], group_size: int):
        self.trajectory = torch.stack([inv.trajectory for inv in inversions], 1)  # (steps + 1, G, C, h, w)
        self.steps = inversions[0].steps
        self.group_size = group_size

    def begin_step(self, step: int) -> None:
        pass

    def end_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        src = self.trajectory[self.steps - step - 1].to(latents)
        grouped = latents.reshape(-1, self.group_size, *latents.shape[1:])
        return torch.cat([src[:, None], grouped[:, 1:]], 1).reshape(latents.shape)
