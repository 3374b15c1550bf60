"""InstructPix2Pix fine-tuning on a tiny random-weight pipeline: the widened UNet starts as the
base model, conditioning dropout has the asked-for rates, resume is exact, and the saved folder
is a diffusers `StableDiffusionInstructPix2PixPipeline` that edits with dual guidance."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline

from manip.ip2p.finetune import (DropoutSettings, PairTensors, encode_pairs, finetune, instruct_pipeline, ip2p_loss,
                                 widen_conv_in)
from manip.models.schedulers import training_scheduler
from manip.training.images import batch_rng
from manip.training.loop import LoopConfig
from tiny_pipeline import tiny_pipeline


@pytest.fixture(scope="module")
def base():
    return tiny_pipeline("epsilon", smooth=True, image_size=64)


@pytest.fixture(scope="module")
def data(base) -> PairTensors:
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    edited = np.clip(inputs.astype(int) + 40, 0, 255).astype(np.uint8)
    prompts = ["make it brighter", "add light", "make it brighter"] * 4
    return encode_pairs(base.vae, base.text_encoder, base.tokenizer, inputs, edited, prompts)


def test_pair_tensors(data):
    assert data.source.shape == (12, 4, 16, 16) and data.target_std.min() > 0
    assert len(data.prompts) == 2 and data.prompt_index.tolist()[:3] == [1, 0, 1]


def test_widened_unet_ignores_the_image_channels_at_start(base):
    unet = widen_conv_in(copy.deepcopy(base.unet))
    assert unet.config.in_channels == 8 and unet.conv_in.weight.shape[1] == 8
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    ctx = torch.randn(2, base.tokenizer.model_max_length, base.text_encoder.config.hidden_size)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        plain = base.unet(x, t, ctx).sample
        widened = unet(torch.cat([x, torch.randn(2, 4, 16, 16)], 1), t, ctx).sample
    torch.testing.assert_close(widened, plain, rtol=1e-6, atol=1e-7)  # kernels for 4 and 8 channels may sum in another order


def test_dropout_rates():
    d = DropoutSettings(0.05, 0.05, 0.05)
    u = torch.from_numpy(np.concatenate([batch_rng(0, s).random(1000) for s in range(20)])).float()
    text, image = d.masks(u)  # what `ip2p_loss` drops
    rates = [(text & ~image).float().mean(), (image & ~text).float().mean(), (text & image).float().mean()]
    assert all(abs(float(r) - 0.05) < 0.01 for r in rates), rates
    text, image = DropoutSettings(0.1, 0.2, 0.3).masks(u)
    rates = [(text & ~image).float().mean(), (image & ~text).float().mean(), (text & image).float().mean()]
    assert all(abs(float(r) - want) < 0.015 for r, want in zip(rates, (0.1, 0.2, 0.3))), rates
    with pytest.raises(ValueError, match="sum to at most 1"):
        DropoutSettings(0.5, 0.5, 0.5)


def test_dropped_conditions_are_not_read(base, data):
    """Dropping both conditions makes the loss blind to the input image and the instruction;
    keeping them, it reads both."""
    unet = widen_conv_in(copy.deepcopy(base.unet))
    with torch.no_grad():
        unet.conv_in.weight[:, base.unet.config.in_channels :].normal_()  # image channels that matter
    other = dataclasses.replace(data, source=torch.randn_like(data.source), prompts=torch.randn_like(data.prompts))
    sched = training_scheduler()
    for dropout, blind in ((DropoutSettings(0, 0, 1), True), (DropoutSettings(0, 0, 0), False)):
        with torch.no_grad():
            losses = [ip2p_loss(unet, sched, d, 4, dropout, 0, 3) for d in (data, other)]
        assert torch.equal(*losses) == blind


def test_sharded_loss_is_the_full_batch_loss(base, data):
    unet = widen_conv_in(copy.deepcopy(base.unet))
    sched = training_scheduler()
    full = ip2p_loss(unet, sched, data, 4, DropoutSettings(), 0, 3)
    halves = [ip2p_loss(unet, sched, data, 4, DropoutSettings(), 0, 3, shard=(r, 2)) for r in (0, 1)]
    assert torch.allclose(full, sum(halves) / 2, atol=1e-5)


def test_resume_is_exact(base, data, tmp_path):
    def run(steps: int, ckpt):
        unet = widen_conv_in(copy.deepcopy(base.unet))
        cfg = LoopConfig(steps=steps, lr=1e-3, warmup=1, ema_decay=0.9, checkpoint_every=2)
        return finetune(unet, training_scheduler(), data, cfg, 4, DropoutSettings(), 0, ckpt)

    straight = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed = run(4, tmp_path / "b")
    assert resumed.resumed_from == 2
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="fewer than one batch"):
        finetune(widen_conv_in(copy.deepcopy(base.unet)), training_scheduler(), data,
                 LoopConfig(steps=1, lr=1e-3), 64, DropoutSettings(), 0, tmp_path / "c")


def test_saved_pipeline_edits_with_dual_guidance(base, tmp_path):
    pipe = instruct_pipeline(base, widen_conv_in(copy.deepcopy(base.unet)))
    pipe.save_pretrained(tmp_path / "ip2p")
    loaded = StableDiffusionInstructPix2PixPipeline.from_pretrained(tmp_path / "ip2p")
    loaded.set_progress_bar_config(disable=True)
    from PIL import Image

    image = Image.fromarray(np.full((64, 64, 3), 120, np.uint8))
    out = loaded("make it night", image=image, num_inference_steps=3, guidance_scale=7.5, image_guidance_scale=1.5,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert out.size == (64, 64)
    assert type(loaded.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
