"""The shared training loop: learning, exact kill-and-resume, stale checkpoints, atomic saves."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from manip.training.checkpoint import load_checkpoint, save_checkpoint
from manip.training.images import batch_rng
from manip.training.loop import LoopConfig, train

D_IN, D_OUT = 6, 3
TRUE_W = torch.from_numpy(np.random.default_rng(123).normal(size=(D_OUT, D_IN))).float()


class Killed(RuntimeError):
    """Stands in for the process being killed in the middle of a step."""


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.Tanh(), torch.nn.Linear(16, D_OUT))


def regression_loss(model: torch.nn.Module, seed: int = 0, kill_at: int | None = None, calls: list | None = None):
    """Batch drawn from (seed, step) only, as every trainer in the project does."""

    def loss_fn(step: int):
        if calls is not None:
            calls.append(step)
        if kill_at is not None and step == kill_at:
            raise Killed(f"killed at step {step}")
        rng = batch_rng(seed, step)
        x = torch.from_numpy(rng.normal(size=(32, D_IN))).float()
        y = x @ TRUE_W.T + 0.01 * torch.from_numpy(rng.normal(size=(32, D_OUT))).float()
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss, {"mse": loss.item()}

    return loss_fn


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_goes_down(tmp_path):
    model = make_model()
    cfg = LoopConfig(steps=30, lr=0.03, warmup=2, log_every=5, checkpoint_every=100)
    result = train(model, regression_loss(model), cfg, tmp_path / "ckpt")
    assert [row["step"] for row in result.history] == [5, 10, 15, 20, 25, 30]
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    assert result.resumed_from == 0
    assert not result.model.training


def test_fused_optimizer_follows_the_loop_up_to_rounding(tmp_path):
    runs = {}
    for fused in (False, True):
        model = make_model()
        cfg = LoopConfig(steps=20, lr=0.03, warmup=2, checkpoint_every=100, fused=fused)
        runs[fused] = state(train(model, regression_loss(model), cfg, tmp_path / str(fused)).model)
    for k in runs[False]:
        torch.testing.assert_close(runs[True][k], runs[False][k], rtol=1e-4, atol=1e-5)


def test_parameter_groups_scale_their_rate(tmp_path):
    """A group's `lr_scale` is its rate over the schedule's: 0 freezes it, 2 trains it as a run at
    twice the rate would."""
    model = make_model()
    first = state(model)
    groups = [{"params": list(model[0].parameters()), "lr_scale": 0.0}, {"params": list(model[2].parameters())}]
    trained = state(train(model, regression_loss(model), LoopConfig(steps=10, lr=0.03, warmup=2), tmp_path / "a",
                          params=groups).model)
    assert all(torch.equal(trained[k], first[k]) for k in ("0.weight", "0.bias"))
    assert not torch.equal(trained["2.weight"], first["2.weight"])
    runs = []
    for name, lr, scale in (("b", 0.06, 1.0), ("c", 0.03, 2.0)):
        model = make_model()
        groups = [{"params": list(model.parameters()), "lr_scale": scale}]
        runs.append(state(train(model, regression_loss(model), LoopConfig(steps=10, lr=lr, warmup=2), tmp_path / name,
                                params=groups).model))
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kill_at", [6, 7])
@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
@pytest.mark.parametrize("fused", [False, True])
def test_kill_and_resume_is_exact(tmp_path, kill_at, ema_decay, fused):
    # The logged row of steps 5-8 spans the resume at 6: its mean must cover all four steps.
    cfg = LoopConfig(steps=10, lr=0.02, warmup=3, ema_decay=ema_decay, checkpoint_every=2, log_every=4, fused=fused)
    straight = make_model(0)
    ref = train(straight, regression_loss(straight), cfg, tmp_path / "straight")

    victim = make_model(0)
    with pytest.raises(Killed):
        train(victim, regression_loss(victim, kill_at=kill_at), cfg, tmp_path / "resumed")
    # A fresh process: different initial weights, which the checkpoint must overwrite.
    fresh = make_model(99)
    calls: list[int] = []
    resumed = train(fresh, regression_loss(fresh, calls=calls), cfg, tmp_path / "resumed")
    assert resumed.resumed_from == 6
    assert calls == [6, 7, 8, 9]
    assert_same_state(state(ref.model), state(resumed.model))
    if ema_decay:
        assert_same_state(state(straight), state(fresh))  # raw weights too, not only EMA
        assert not torch.equal(state(ref.model)["0.weight"], state(straight)["0.weight"])
    assert resumed.history == ref.history


def test_extend_finished_run_matches_straight_run(tmp_path):
    """6 steps, then a new call with steps=10 on the same checkpoint dir; warm-up longer than the
    run keeps the learning-rate schedule independent of `steps`, so the two runs must agree."""
    long = LoopConfig(steps=10, lr=0.02, warmup=100, checkpoint_every=2, log_every=2)
    short = LoopConfig(steps=6, lr=0.02, warmup=100, checkpoint_every=2, log_every=2)
    straight = make_model(0)
    ref = train(straight, regression_loss(straight), long, tmp_path / "a", fingerprint={"run": 1})

    first = make_model(0)
    part = train(first, regression_loss(first), short, tmp_path / "b", fingerprint={"run": 1})
    assert part.history[-1]["step"] == 6
    second = make_model(5)
    calls: list[int] = []
    resumed = train(second, regression_loss(second, calls=calls), long, tmp_path / "b", fingerprint={"run": 1})
    assert resumed.resumed_from == 6 and calls == [6, 7, 8, 9]
    assert_same_state(state(ref.model), state(resumed.model))


def test_finished_run_is_not_retrained(tmp_path):
    cfg = LoopConfig(steps=4, lr=0.01, warmup=1, checkpoint_every=2, log_every=2)
    model = make_model()
    done = train(model, regression_loss(model), cfg, tmp_path, fingerprint={"x": 1})
    again = make_model(7)
    calls: list[int] = []
    result = train(again, regression_loss(again, calls=calls), cfg, tmp_path, fingerprint={"x": 1})
    assert calls == [] and result.resumed_from == 4
    assert_same_state(state(done.model), state(result.model))


def test_other_fingerprint_is_not_resumed(tmp_path):
    cfg = LoopConfig(steps=4, lr=0.01, warmup=1, checkpoint_every=2, log_every=2)
    model = make_model()
    train(model, regression_loss(model), cfg, tmp_path, fingerprint={"lr": 0.01})
    old_state = (tmp_path / "last" / "state.safetensors").read_bytes()

    other = make_model(1)
    calls: list[int] = []
    result = train(other, regression_loss(other, calls=calls), cfg, tmp_path, fingerprint={"lr": 0.02})
    assert result.resumed_from == 0 and calls == [0, 1, 2, 3]
    stale = tmp_path / "stale"
    assert json.loads((stale / "meta.json").read_text())["fingerprint"] == {"lr": 0.01}
    assert (stale / "state.safetensors").read_bytes() == old_state
    assert json.loads((tmp_path / "last" / "meta.json").read_text())["fingerprint"] == {"lr": 0.02}


def test_save_checkpoint_is_atomic_and_round_trips(tmp_path):
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    loss = regression_loss(model)(0)[0]
    loss.backward()
    opt.step()
    target = tmp_path / "ckpts" / "last"
    save_checkpoint(target, {"model": model}, opt, {"step": 1, "history": []})
    save_checkpoint(target, {"model": model}, opt, {"step": 2, "history": [{"step": 2, "loss": 0.5}]})
    assert sorted(p.name for p in target.parent.iterdir()) == ["last"]
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "state.safetensors"]

    other = make_model(3)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.5)
    meta = load_checkpoint(target, {"model": other}, other_opt)
    assert meta == {"step": 2, "history": [{"step": 2, "loss": 0.5}]}
    assert_same_state(state(model), state(other))
    assert other_opt.param_groups[0]["lr"] == 0.01
    for p, q in zip(model.parameters(), other.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], other_opt.state[q][key]), key

    # A save that fails half-way leaves the previous checkpoint untouched.
    before = (target / "state.safetensors").read_bytes()
    with pytest.raises(TypeError):
        save_checkpoint(target, {"model": make_model(4)}, opt, {"step": 3, "bad": object()})
    assert (target / "state.safetensors").read_bytes() == before
    assert json.loads((target / "meta.json").read_text())["step"] == 2


def test_tiny_vae_learns_on_tiny_world(tiny_world, tmp_path):
    """A few dozen steps cannot fit the whole world; two full-size train images can be learnt
    visibly in that time, which is what this checks (each history row averages 10 steps)."""
    from manip.models.factory import make_vae
    from manip.training.vae import train_vae
    from manip.world.dataset import load_split

    images = np.asarray(load_split(tiny_world / "train").images[:2])
    torch.manual_seed(0)
    vae = make_vae([8, 16, 16], 1, 4, 8, 64)
    cfg = LoopConfig(steps=30, lr=1e-2, warmup=3, log_every=10, checkpoint_every=100)
    result = train_vae(vae, images, cfg, batch_size=2, crop=64, kl_weight=1e-6, seed=0,
                       checkpoint_dir=tmp_path / "vae", fingerprint={"test": "vae"})
    l1 = [row["l1"] for row in result.history]
    assert [row["step"] for row in result.history] == [10, 20, 30]
    assert all(np.isfinite(l1))
    assert l1[-1] < 0.85 * l1[0], l1
    assert (tmp_path / "vae" / "last" / "state.safetensors").is_file()
