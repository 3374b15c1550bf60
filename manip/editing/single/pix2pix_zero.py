"""pix2pix-zero (Parmar et al., 2023): training-free editing along a text-embedding direction,
with cross-attention guidance keeping the input's structure.

1. Edit direction: the mean text embedding of target-side sentences minus that of source-side
   sentences (`EditRequest.sentences`, e.g. a caption-edit backend's outputs for many captions;
   without them, the two captions themselves).
2. Regularised DDIM inversion: at every inversion step the predicted noise is pushed toward
   white Gaussian noise (`reg_steps` gradient steps on an auto-correlation loss over a pyramid
   of random shifts, plus a KL term to N(0, 1)), so the inverted x_T is editable.
3. Reference pass: sample from x_T under the source caption, recording the cross-attention
   maps of every step (the reconstruction).
4. Edit pass: sample under source caption + direction; before each step the latents take a
   gradient step (size `xa_guidance`) on the squared distance of every cross-attention layer's
   map to the reference pass's, so objects stay in place.

The inversion and the reference maps depend on the image and the source caption only: both are
cached for every later edit of the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import AttentionCall, controlled_attention
from ..inversion import _alpha, ddim_jump, ddim_scheduler
from .base import EditOutput, EditRequest, SingleImageEditor, _Run, cfg_predictor, ddim_sample, eps_of, frozen


@dataclass(frozen=True)
class Pix2PixZeroConfig:
    steps: int = 50
    guidance_scale: float = 7.5
    reg_steps: int = 5
    lambda_ac: float = 20.0
    lambda_kl: float = 20.0
    ac_rolls: int = 5
    xa_guidance: float = 0.1
    direction_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.reg_steps < 0 or self.ac_rolls < 1:
            raise ValueError(f"pix2pix-zero needs steps >= 1, reg_steps >= 0 and ac_rolls >= 1; got {self}")


def autocorrelation_loss(eps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Squared auto-correlation of each (sample, channel) noise map at one random shift per
    level of a 2x pyramid, summed (the reference implementation's loss)."""
    loss = eps.new_zeros(())
    x = eps
    while True:
        shift = int(torch.randint(x.shape[-1] // 2, (1,), generator=gen)) if x.shape[-1] > 1 else 0
        for dim in (2, 3):
            loss = loss + (x * torch.roll(x, shift, dims=dim)).mean(dim=(2, 3)).pow(2).sum()
        if x.shape[-1] <= 8:
            return loss
        x = F.avg_pool2d(x, 2)


def kl_loss(eps: torch.Tensor) -> torch.Tensor:
    var = eps.var()
    return var + eps.mean() ** 2 - 1 - torch.log(var + 1e-7)


class _Capture:
    """Each cross-attention layer's map for the last (conditional) row, averaged over heads."""

    def __init__(self):
        self.maps: dict[str, torch.Tensor] = {}

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if call.is_cross:
            self.maps[call.name.replace(".processor", "")] = probs[-1].mean(0)
        return probs


class Pix2PixZero(SingleImageEditor):
    name = "pix2pix-zero"
    version = 2
    uses_sentences = True
    Config = Pix2PixZeroConfig
    config: Pix2PixZeroConfig

    def sentences(self, request: EditRequest) -> tuple[tuple[str, ...], tuple[str, ...]]:
        src, tgt = request.sentences if request.sentences is not None else ((request.source,), (request.target,))
        if not src or not tgt:
            raise ValueError("pix2pix-zero needs at least one sentence on each side of the edit direction")
        return tuple(src), tuple(tgt)

    def prompts(self, request: EditRequest) -> list[str]:
        src, tgt = self.sentences(request)
        return [request.source, *src, *tgt]

    def direction(self, request: EditRequest) -> torch.Tensor:
        """Two text-encoder passes: cheaper to redo than to cache."""
        src, tgt = self.sentences(request)
        return self.text(tgt).mean(0, keepdim=True) - self.text(src).mean(0, keepdim=True)

    def invert(self, z0: torch.Tensor, cond: torch.Tensor, seed: int) -> torch.Tensor:
        """Regularised DDIM inversion z_0 -> x_T under `cond` (guidance 1)."""
        c = self.config
        scheduler = ddim_scheduler(self.pipe)
        scheduler.set_timesteps(c.steps)
        stride = scheduler.config.num_train_timesteps // c.steps
        gen = torch.Generator().manual_seed(seed)
        x = z0
        for t in reversed(scheduler.timesteps.tolist()):
            with torch.no_grad():
                eps = eps_of(self.pipe, self.pipe.unet, x, t, cond)
            for _ in range(c.reg_steps):
                # The reference's order: `ac_rolls` auto-correlation steps (each a 1 / ac_rolls
                # share of lambda_ac), then one KL step.
                for _ in range(c.ac_rolls):
                    e = eps.detach().requires_grad_(True)
                    (grad,) = torch.autograd.grad(autocorrelation_loss(e, gen), e)
                    eps = (e - c.lambda_ac / c.ac_rolls * grad).detach()
                e = eps.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(kl_loss(e), e)
                eps = (e - c.lambda_kl * grad).detach()
            x = ddim_jump(x, eps, _alpha(scheduler, t - stride), _alpha(scheduler, t))
        return x

    def reference(self, x_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> dict[str, torch.Tensor]:
        """The source caption's pass from x_T: its final latents and each step's attention maps."""
        out: dict[str, torch.Tensor] = {}
        capture = _Capture()
        guided = cfg_predictor(self.pipe, self.pipe.unet, cond, uncond, self.config.guidance_scale)

        def predict(x, t, i):
            capture.maps = {}
            with controlled_attention(self.pipe.unet, capture):
                eps = guided(x, t, i)
            out.update({f"maps.{i}.{layer}": m.detach() for layer, m in capture.maps.items()})
            return eps

        out["latents"] = ddim_sample(self.pipe, x_T, predict, self.config.steps)
        return out

    def _edit(self, run: _Run) -> EditOutput:
        r, c = run.request, self.config
        cond, uncond = self.text([r.source]), self.text([""])
        key = [r.image, r.source, r.seed, c.steps, c.reg_steps, c.lambda_ac, c.lambda_kl, c.ac_rolls]
        x_T = run.part("inversion", key, lambda _: {"x_T": self.invert(self.latents(r.image), cond, r.seed)})["x_T"]
        x_T = x_T.to(self.device)
        ref = run.part("reference", [*key, c.guidance_scale], lambda _: self.reference(x_T, cond, uncond))
        edit_cond = cond + c.direction_scale * self.direction(r)
        guided = cfg_predictor(self.pipe, self.pipe.unet, edit_cond, uncond, c.guidance_scale)
        capture = _Capture()

        def steer(i, t, x):
            x = x.detach().requires_grad_(True)
            capture.maps = {}
            with controlled_attention(self.pipe.unet, capture):
                eps_of(self.pipe, self.pipe.unet, x, t, edit_cond)
            loss = sum(((m - ref[f"maps.{i}.{layer}"].to(m)) ** 2).sum() for layer, m in capture.maps.items())
            (grad,) = torch.autograd.grad(loss, x)
            return x - c.xa_guidance * grad

        with frozen(self.pipe.unet):
            edited = ddim_sample(self.pipe, x_T, guided, c.steps, steer=steer if c.xa_guidance > 0 else None)
        images = self.decode(torch.cat([edited, ref["latents"].to(edited)]))
        return run.output(images[0], images[1])
