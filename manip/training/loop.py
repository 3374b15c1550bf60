"""One training loop for every model in the project.

Each trainer supplies a `loss_fn(step)` that draws its own batch from a generator seeded by
(seed, step); together with checkpoints holding model, EMA and optimizer state this makes a
resumed run follow exactly the same trajectory as an uninterrupted one.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, recover_dir, save_checkpoint

LossFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class LoopConfig:
    steps: int
    lr: float
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.0  # 0 disables EMA
    checkpoint_every: int = 500
    log_every: int = 25
    grad_clip: float = 1.0
    # AdamW as one fused kernel over every parameter instead of a loop over tensors: the loop is
    # a sixth of a DreamBooth step on the CPU, three times the fused update. Equal to the loop up
    # to rounding, so the runs that made shipped models keep the loop and their bytes.
    fused: bool = False


def lr_at(cfg: LoopConfig, step: int) -> float:
    """Linear warm-up then cosine decay to 10%: a function of the step, so resume is exact."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class EMA(torch.nn.Module):
    """Exponential moving average of a model's parameters, saved like any module."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            s.lerp_(p.detach(), 1 - decay)
        for s, b in zip(self.shadow.buffers(), model.buffers()):
            s.copy_(b)


def _fingerprint_of(ckpt: Path) -> dict | None:
    return json.loads((ckpt / "meta.json").read_text()).get("fingerprint")


@dataclass
class TrainResult:
    model: torch.nn.Module  # EMA weights when EMA is on
    history: list[dict[str, float]]
    resumed_from: int
    seconds: float  # wall time spent training, summed over resumed runs


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    cfg: LoopConfig,
    checkpoint_dir: Path,
    params: Sequence[torch.nn.Parameter | dict] | None = None,
    desc: str = "train",
    fingerprint: dict | None = None,
    accelerator=None,
) -> TrainResult:
    """Train `model` for `cfg.steps`, resuming from `checkpoint_dir/last` when it was written by
    a run with the same `fingerprint` (the settings, less the step count: raising `steps`
    extends a finished run). A checkpoint from other settings is set aside, never mixed in.

    With an `accelerate.Accelerator` of several processes, `loss_fn` must run the model through
    its data-parallel wrapper (so gradients are averaged) on its share of the batch; every
    process keeps identical weights, and only the main one writes checkpoints and a progress bar.

    `params` (default: the model's parameters that require grad) may hold optimizer parameter
    groups; a group's `lr_scale` multiplies the scheduled rate for it (a new embedding row
    trained beside a network, say, which needs a far larger rate)."""
    main = accelerator is None or accelerator.is_main_process
    groups = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **({"fused": True} if cfg.fused else {}))
    trainable = [p for group in opt.param_groups for p in group["params"]]
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    modules: dict[str, torch.nn.Module] = {"model": model, **({"ema": ema} if ema else {})}
    ckpt = checkpoint_dir / "last"
    recover_dir(ckpt)
    step, history, seconds, running = 0, [], 0.0, {}
    if main and (ckpt / "meta.json").is_file() and _fingerprint_of(ckpt) != fingerprint:
        stale = ckpt.with_name("stale")
        shutil.rmtree(stale, ignore_errors=True)
        ckpt.rename(stale)
        tqdm.write(f"{desc}: checkpoint in {ckpt} is from other settings; moved to {stale}, starting fresh")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if (ckpt / "meta.json").is_file():
        meta = load_checkpoint(ckpt, modules, opt)
        step, history, seconds = meta["step"], meta["history"], meta.get("seconds", 0.0)
        running = meta.get("running", {})  # sums since the last logged row, so that row averages them all
    resumed_from = step
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, dynamic_ncols=True, disable=not main)
    started = time.perf_counter() - seconds
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step) * group.get("lr_scale", 1.0)
        loss, logs = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        if ema:
            ema.update(model, step)
        step += 1
        for k, v in {"loss": loss.detach().item(), **logs}.items():
            running[k] = running.get(k, 0.0) + v
        if step % cfg.log_every == 0 or step == cfg.steps:
            n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            row = {"step": step, **{k: v / n for k, v in running.items()}}
            history.append(row)
            running = {}
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step"})
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            seconds = time.perf_counter() - started
            if main:
                save_checkpoint(ckpt, modules, opt,
                                {"step": step, "history": history, "fingerprint": fingerprint, "seconds": seconds,
                                 "running": running})
            if accelerator is not None:
                accelerator.wait_for_everyone()
    bar.close()
    model.eval()
    final = ema.shadow if ema else model
    final.eval()
    return TrainResult(model=final, history=history, resumed_from=resumed_from, seconds=round(seconds, 1))
