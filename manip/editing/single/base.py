"""The interface the single-image editing methods share, their cached parts and the pieces
they are built from (a per-image fine-tune, a guided DDIM loop).

An editor turns an `EditRequest` (image, source caption, target caption, and optionally an
instruction or sentence sets) into an `EditOutput`. The expensive work a method does before it
can edit -- an optimised embedding, a fine-tuned UNet, an inversion, an edit direction -- is a
*part*: a dict of tensors cached under a key of (image, model, the part's own settings, the
parts it was made from), so a second edit of the same image reuses what does not depend on the
target. Each part's time is reported apart from the edit's, and so is what a method keeps per
image, so a user can see what caching buys.

The base model is never changed: a fine-tune trains a copy of the UNet, and the samplers take
the UNet to run as an argument.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, ClassVar, Iterator, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from manip.prompts import read_prompts
from manip.sampling import decode, encode_prompts
from manip.training.checkpoint import atomic_write
from manip.training.images import batch_rng
from manip.training.loop import LoopConfig, train
from manip.training.unet import diffusion_loss

from ..images import load_image
from ..inversion import _alpha, ddim_jump, ddim_scheduler, encode_image, model_id, to_eps

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EditRequest:
    image: np.ndarray  # uint8 HxWx3 at the model's resolution (see `prepare_request`)
    source: str  # caption of the input image
    target: str  # caption of the wanted output
    instruction: str | None = None  # for instruction-following editors
    # pix2pix-zero's sentence sets (source-side, target-side); None: the two captions alone.
    sentences: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    seed: int = 0


@dataclass
class EditOutput:
    image: np.ndarray  # uint8 HxWx3
    reconstruction: np.ndarray | None  # the method's rendition of the input, where it has one
    seconds: dict[str, float]  # per part, and "edit" for the rest; a cached part costs its load time
    cached: dict[str, bool]  # per part: read from the cache rather than computed
    stored_bytes: int  # what the method keeps per image to edit it again
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. an eta sweep

    @property
    def total_seconds(self) -> float:
        return round(sum(self.seconds.values()), 3)


def prepare_request(pipe: StableDiffusionPipeline, image, source: str, target: str, **kw) -> tuple[EditRequest, list[str]]:
    """An `EditRequest` from any image input `load_image` takes, with its notes (e.g. a resize);
    prompts `read_prompts` refuses are refused here, before any work, and the others are kept in
    the spelling the model reads."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    arr, notes = load_image(image, size)
    prompts = [source, target, *([kw["instruction"]] if kw.get("instruction") else [])]
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("source, target and instruction prompts must be non-empty strings")
    source, target, *instruction = read_prompts(pipe.tokenizer, prompts)
    if instruction:
        kw["instruction"] = instruction[0]
    return EditRequest(arr, source, target, **kw), notes


def digest(*items) -> str:
    """Key of a part: arrays by their bytes, everything else by its JSON."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, np.ndarray):
            h.update(str(item.shape).encode() + item.tobytes())
        else:
            h.update(json.dumps(item, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


class PartCache:
    """Parts on disk as `<root>/<method>/<part>/<key>.safetensors`, written atomically. With no
    root, parts live in a temporary folder removed by `close`. A fine-tune in progress keeps its
    checkpoints beside its part, so a killed one resumes."""

    def __init__(self, root: str | Path | None = None):
        self._temp = None if root is not None else tempfile.mkdtemp(prefix="manip-parts-")
        self.root = Path(root if root is not None else self._temp)

    def path(self, method: str, part: str, key: str) -> Path:
        return self.root / method / part / f"{key}.safetensors"

    def checkpoint_dir(self, method: str, part: str, key: str) -> Path:
        return self.root / method / part / f"{key}.ckpt"

    def load(self, method: str, part: str, key: str) -> Tensors | None:
        path = self.path(method, part, key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except (OSError, SafetensorError):
            return None  # a damaged part is recomputed, not trusted

    def store(self, method: str, part: str, key: str, tensors: Tensors) -> int:
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        atomic_write(self.path(method, part, key), data)
        shutil.rmtree(self.checkpoint_dir(method, part, key), ignore_errors=True)
        return len(data)

    def close(self) -> None:
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)


class _Run:
    """Bookkeeping of one edit: seconds and cache hits per part, bytes kept per image."""

    def __init__(self, editor: "SingleImageEditor", request: EditRequest):
        self.editor, self.request = editor, request
        self.seconds: dict[str, float] = {}
        self.cached: dict[str, bool] = {}
        self.stored = 0
        self.started = time.perf_counter()

    def part(self, name: str, key_items: Sequence, make: Callable[[Path], Tensors], keep: bool = True) -> Tensors:
        """The cached part `name`, made by `make(checkpoint_dir)` on a miss. `keep`: whether the
        method needs it again to re-edit the image (counted in `stored_bytes`)."""
        cache, method = self.editor.cache, self.editor.name
        key = digest(self.editor.identity, *key_items)
        started = time.perf_counter()
        tensors = cache.load(method, name, key)
        hit = tensors is not None
        if not hit:
            tensors = make(cache.checkpoint_dir(method, name, key))
            cache.store(method, name, key, tensors)
        self.seconds[name] = round(time.perf_counter() - started, 3)
        self.cached[name] = hit
        if keep:
            self.stored += sum(t.numel() * t.element_size() for t in tensors.values())
        return tensors

    def output(self, image: np.ndarray, reconstruction: np.ndarray | None, **extras: np.ndarray) -> EditOutput:
        total = time.perf_counter() - self.started
        self.seconds["edit"] = round(total - sum(self.seconds.values()), 3)
        return EditOutput(image, reconstruction, self.seconds, self.cached, self.stored, dict(extras))


class SingleImageEditor(ABC):
    """One editing method. Subclasses set `name`, `version` (raised whenever a change alters
    what the method computes, so cached parts and benchmark shards of older code are not
    reused), `Config` (a frozen dataclass validated in `__post_init__`), and implement `_edit`;
    `prompts` lists every prompt the edit will encode, checked before any work.

    Results are bit-for-bit reproducible on CPU; CUDA kernels are not all deterministic."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Config: ClassVar[type]
    uses_sentences: ClassVar[bool] = False  # reads `EditRequest.sentences`

    def __init__(self, pipe: StableDiffusionPipeline, config, cache: PartCache):
        self.pipe = pipe
        self.config = config
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}, got {type(self.config).__name__}")
        self.cache = cache
        self.model = model_id(pipe)
        # What every part depends on besides its own inputs: weights, noise schedule, code.
        self.identity = {"model": self.model, "scheduler": {k: v for k, v in dict(pipe.scheduler.config).items()
                                                            if not k.startswith("_")},
                         "method": self.name, "version": self.version}

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def prompts(self, request: EditRequest) -> list[str]:
        return [request.source, request.target]

    def placeholders(self) -> set[str]:
        """Words the method adds to prompts that name what it learnt (a rare-token identifier):
        they belong to no language, so a Russian prompt may carry them."""
        return set()

    def edit(self, request: EditRequest) -> EditOutput:
        return self._edit(self.start(request))

    def start(self, request: EditRequest) -> _Run:
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        if request.image.shape != (size, size, 3) or request.image.dtype != np.uint8:
            raise ValueError(f"{self.name}: the image must be uint8 {size}x{size}x3 (use prepare_request), "
                             f"got {request.image.dtype} {request.image.shape}")
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{self.name}: call edit() outside torch.inference_mode(): fine-tunes, inversions "
                               "and attention guidance need autograd")
        prompts = self.prompts(request)
        if any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError(f"{self.name}: every prompt must be a non-empty string, got {prompts}")
        read_prompts(self.pipe.tokenizer, prompts, self.placeholders())
        return _Run(self, request)

    @abstractmethod
    def _edit(self, run: _Run) -> EditOutput: ...

    # ---- shared pieces

    def latents(self, image: np.ndarray) -> torch.Tensor:
        return encode_image(self.pipe, image)

    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        return encode_prompts(self.pipe, list(prompts), self.placeholders()).clone()

    def noise(self, seed: int, side: int | None = None) -> torch.Tensor:
        """x_T (latent side `side`, default the model's) from a CPU generator, so a seed gives the
        same noise on any device."""
        side = side or self.pipe.unet.config.sample_size
        shape = (1, self.pipe.vae.config.latent_channels, side, side)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(self.device, self.pipe.unet.dtype)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return decode(self.pipe, latents)


@dataclass(frozen=True)
class TuneConfig:
    """A per-image fine-tune: `steps` optimizer steps, each on `batch` noisings of the image."""

    steps: int
    lr: float
    batch: int = 4

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError(f"a fine-tune needs steps >= 1, batch >= 1 and lr > 0, got {self}")


class Holder(torch.nn.Module):
    """A free tensor as a module, so the training loop can optimise and checkpoint it."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = torch.nn.Parameter(value.detach().clone())


def fit(module: torch.nn.Module, loss: Callable[[torch.Generator, np.random.Generator], torch.Tensor],
        cfg: TuneConfig, seed: int, checkpoint_dir: Path, desc: str, fingerprint: dict) -> torch.nn.Module:
    """Optimise `module`'s trainable parameters with the project's loop (a short warm-up, then
    cosine decay to a tenth of `cfg.lr`), atomic checkpoints every quarter of the run, exact
    resume."""
    loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup=min(10, cfg.steps - 1),
                      checkpoint_every=max(1, cfg.steps // 4), log_every=max(1, min(25, cfg.steps)))

    def step_loss(step: int):
        rng = batch_rng(seed, step)
        return loss(torch.Generator().manual_seed(int(rng.integers(2**62))), rng), {}

    result = train(module, step_loss, loop, checkpoint_dir, desc=desc, fingerprint=fingerprint)
    module.requires_grad_(False)
    return result.model


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """No weight gradients for `module` inside the block (backward then only reaches what is
    being optimised: an embedding, the latents); its flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def denoising_loss(pipe: StableDiffusionPipeline, unet, latents: torch.Tensor, context: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
    """The plain (unweighted) LDM loss of `latents` (B, C, h, w) under `context` (B or 1, K, D),
    as the single-image papers fine-tune with."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return diffusion_loss(unet, scheduler, latents, context.expand(len(latents), *context.shape[-2:]), gen,
                          min_snr=False)


def tuned_unet(pipe: StableDiffusionPipeline, state: Tensors | None = None):
    """A trainable copy of the base UNet, with `state` loaded if given; the base is untouched."""
    unet = copy.deepcopy(pipe.unet)
    if state is not None:
        unet.load_state_dict({k: v.to(unet.dtype) for k, v in state.items()})
    return unet.requires_grad_(state is None).to(pipe.unet.device)


def finetune(pipe: StableDiffusionPipeline, batches: Callable[[np.random.Generator, int], tuple[torch.Tensor, torch.Tensor]],
             cfg: TuneConfig, seed: int, checkpoint_dir: Path, desc: str, fingerprint: dict) -> Tensors:
    """Fine-tune a copy of the UNet on `batches(rng, n) -> (latents, context)` and return its
    weights. The base UNet's own weights are never touched."""
    unet = tuned_unet(pipe)
    unet.train()

    def loss(gen, rng):
        latents, context = batches(rng, cfg.batch)
        return denoising_loss(pipe, unet, latents, context, gen)

    fit(unet, loss, cfg, seed, checkpoint_dir, desc, fingerprint)
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


Predict = Callable[[torch.Tensor, int, int], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """The DDIM timesteps a run visits (from the noise level of fraction `start` of the schedule)
    and the cumulative alpha at each of them and after each step."""

    timesteps: list[int]
    alphas: list[torch.Tensor]
    next_alphas: list[torch.Tensor]


def schedule(pipe: StableDiffusionPipeline, steps: int, start: float = 1.0) -> Schedule:
    if steps < 1 or not 0.0 < start <= 1.0:
        raise ValueError(f"need steps >= 1 and start in (0, 1], got {steps} and {start}")
    scheduler = ddim_scheduler(pipe)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    timesteps = timesteps[len(timesteps) - max(1, round(start * len(timesteps))):]
    stride = scheduler.config.num_train_timesteps // steps
    return Schedule(timesteps, [_alpha(scheduler, t) for t in timesteps],
                    [_alpha(scheduler, t - stride) for t in timesteps])


def mix(z0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) for the cumulative alpha of x_t."""
    alpha = alpha.to(z0)
    return alpha.sqrt() * z0 + (1 - alpha).sqrt() * noise


def ddim_sample(pipe: StableDiffusionPipeline, latents: torch.Tensor, predict: Predict, steps: int,
                start: float = 1.0, after_step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                steer: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Deterministic DDIM from `latents` at the noise level of fraction `start` of the schedule
    (1: pure noise, < 1: an SDEdit-style partial run) to x_0. `predict(x, t, k)` returns the
    noise prediction (guidance already applied) at the run's k-th step; `steer(k, t, x)` may
    move the latents before it, by gradient (autograd is on for it); `after_step(k, alpha, x)`
    may replace them after the step (`alpha`: the cumulative alpha they are now at)."""
    plan = schedule(pipe, steps, start)
    x = latents
    for k, (t, a_t, a_next) in enumerate(zip(plan.timesteps, plan.alphas, plan.next_alphas)):
        if steer is not None:
            with torch.enable_grad():
                x = steer(k, t, x).detach()
        with torch.no_grad():
            x = ddim_jump(x, predict(x, t, k), a_t, a_next)
            if after_step is not None:
                x = after_step(k, a_next, x)
    return x


def eps_of(pipe: StableDiffusionPipeline, unet, x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
    """Noise prediction of `unet` for latents x (B, ...) under context (B, K, D), whatever the
    model's prediction type."""
    out = unet(x, t, encoder_hidden_states=context).sample
    return to_eps(out, x, pipe.scheduler.alphas_cumprod[t].to(x), pipe.scheduler.config.prediction_type)


def cfg_predictor(pipe: StableDiffusionPipeline, unet, cond: torch.Tensor, uncond: torch.Tensor,
                  scale: float) -> Predict:
    """Classifier-free guidance with both branches in one batch; `cond` may hold several rows
    (a sweep), each guided against the same unconditional context."""
    n = len(cond)
    context = torch.cat([uncond.expand(n, *uncond.shape[-2:]), cond])

    def predict(x, t, i):
        if x.shape[0] != n:
            x = x.expand(n, *x.shape[1:])
        e_u, e_c = eps_of(pipe, unet, torch.cat([x, x]), t, context).chunk(2)
        return e_u + scale * (e_c - e_u)

    return predict
