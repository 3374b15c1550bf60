"""The heavy paths on a GPU give what they give on the CPU: sampling, Prompt-to-Prompt with
local blending, null-text inversion and editing, UNet training with checkpoint resume,
InstructPix2Pix fine-tuning through `accelerate`, and the CLIP / judge scorers. Skipped where
torch sees no CUDA device; a GPU worker runs it with `pytest tests/test_cuda.py`.

Noise is drawn from CPU generators on both devices, so outputs agree up to floating-point
reduction order; TF32 is switched off so that the tolerances stay tight. Bit-exact resume on a
GPU needs deterministic kernels (cuDNN's fastest backward convolutions accumulate in a varying
order, and Adam magnifies those differences in near-zero gradients), which that test turns on.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from manip.editing.edit import edit_generated, edit_inverted
from manip.editing.inversion import Inversion, invert
from manip.editing.p2p import P2PConfig
from manip.ip2p.finetune import DropoutSettings, encode_pairs, finetune, widen_conv_in
from manip.models.schedulers import training_scheduler
from manip.sampling import generate
from manip.training.loop import LoopConfig
from manip.training.unet import train_unet
from tiny_pipeline import save_tiny_clip_and_judge, tiny_pipeline

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, read at first use
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
SOURCE, TARGET = "a cat on a mat", "a dog on a mat"


@pytest.fixture(autouse=True)
def exact_matmul():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def pair():
    """The same tiny pipeline twice: on the CPU and on the GPU."""
    cpu = tiny_pipeline("epsilon", smooth=True, image_size=64)
    return cpu, copy.deepcopy(cpu).to(CUDA)


def close_images(a: np.ndarray, b: np.ndarray, mean: float = 1.0) -> None:
    diff = np.abs(a.astype(int) - b.astype(int))
    assert a.shape == b.shape
    assert diff.mean() <= mean, f"mean |cpu - cuda| = {diff.mean():.3f} of 255"


def test_sampling_matches_cpu():
    cpu, gpu = pair()
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    a = generate(cpu, [SOURCE, TARGET], gens(), steps=8, guidance_scale=5.0)
    b = generate(gpu, [SOURCE, TARGET], gens(), steps=8, guidance_scale=5.0)
    close_images(a, b)


def test_prompt_to_prompt_with_local_blend_matches_cpu():
    cpu, gpu = pair()
    config = P2PConfig(blend_words=(["cat"], ["dog"]), edit="replace")
    a, b = (edit_generated(p, [SOURCE, TARGET], torch.Generator().manual_seed(3), config, steps=8)
            for p in (cpu, gpu))
    close_images(a, b)


def test_null_text_inversion_and_edit_match_cpu(tmp_path):
    cpu, gpu = pair()
    image = np.asarray(generate(cpu, [SOURCE], [torch.Generator().manual_seed(5)], steps=8)[0])
    inv_cpu = invert(cpu, image, SOURCE, "null-text", steps=6, inner_steps=3)
    inv_gpu = invert(gpu, image, SOURCE, "null-text", steps=6, inner_steps=3)
    assert inv_gpu.trajectory.device.type == "cpu" and inv_gpu.uncond.device.type == "cpu"
    torch.testing.assert_close(inv_gpu.trajectory, inv_cpu.trajectory, atol=1e-3, rtol=1e-3)
    inv_gpu.save(tmp_path / "inv")
    loaded = Inversion.load(tmp_path / "inv", gpu)
    close_images(edit_inverted(cpu, inv_cpu, [TARGET]), edit_inverted(gpu, loaded, [TARGET]), mean=2.0)
    direct = invert(gpu, image, SOURCE, "direct", steps=6)
    assert edit_inverted(gpu, direct, [TARGET]).shape == (2, 64, 64, 3)


def test_unet_training_matches_cpu_and_resumes(tmp_path, deterministic):
    base, _ = pair()
    latents = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    captions = [[SOURCE, "a cat"], [TARGET]] * 4
    cfg = LoopConfig(steps=4, lr=1e-3, warmup=1, ema_decay=0.9, checkpoint_every=2, log_every=1)

    def run(device: str, ckpt, steps: int = 4):
        unet = copy.deepcopy(base.unet).to(device)
        text = copy.deepcopy(base.text_encoder).to(device)
        return train_unet(unet, training_scheduler(), text, base.tokenizer, latents.to(device), captions,
                          LoopConfig(**{**cfg.__dict__, "steps": steps}), 4, 0.1, 0, ckpt)

    on_cpu, on_gpu = run("cpu", tmp_path / "cpu"), run("cuda", tmp_path / "gpu")
    np.testing.assert_allclose([h["loss"] for h in on_gpu.history], [h["loss"] for h in on_cpu.history], rtol=1e-3)
    run("cuda", tmp_path / "resumed", steps=2)
    resumed = run("cuda", tmp_path / "resumed")
    assert resumed.resumed_from == 2
    for (name, a), (_, b) in zip(on_gpu.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_ip2p_finetune_through_accelerate(tmp_path):
    from accelerate import Accelerator

    cpu, gpu = pair()
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    edited = np.clip(inputs.astype(int) + 40, 0, 255).astype(np.uint8)
    prompts = ["make it brighter", "add light"] * 4
    cfg = LoopConfig(steps=3, lr=1e-3, warmup=1, checkpoint_every=3, log_every=1)
    losses = {}
    for name, pipe, accelerator in (("cpu", cpu, None), ("cuda", gpu, Accelerator())):
        data = encode_pairs(pipe.vae, pipe.text_encoder, pipe.tokenizer, inputs, edited, prompts)
        assert data.source.device.type == name
        result = finetune(widen_conv_in(copy.deepcopy(pipe.unet)), training_scheduler(), data, cfg, 4,
                          DropoutSettings(), 0, tmp_path / name, accelerator=accelerator)
        losses[name] = [h["loss"] for h in result.history]
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=1e-3)


def test_scorers_match_cpu(tmp_path):
    from manip.metrics.clip_scores import ClipScorer
    from manip.metrics.judge import AttributeJudge, embeddings, predict

    save_tiny_clip_and_judge(tmp_path)
    images = np.random.default_rng(1).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    texts = [SOURCE, TARGET, "a cat", "a dog", "a mat", ""]
    cpu, gpu = ClipScorer(tmp_path / "clip"), ClipScorer(tmp_path / "clip", device=CUDA)
    np.testing.assert_allclose(gpu.clip_t(images, texts), cpu.clip_t(images, texts), atol=1e-4)
    judge = AttributeJudge.from_pretrained(tmp_path / "judge").eval()
    np.testing.assert_allclose(embeddings(copy.deepcopy(judge).to(CUDA), images), embeddings(judge, images),
                               atol=1e-4, rtol=1e-4)
    for k, v in predict(judge.to(CUDA), images).items():
        assert v.shape == (6, *v.shape[1:]), k


@pytest.mark.parametrize("method", ["dreambooth", "custom_diffusion", "svdiff", "cones", "lora", "textual_inversion"])
def test_customization_artifacts_load_and_merge_on_the_gpu(method, tmp_path):
    """Artifacts trained on the CPU (one with untrained identifier rows, as the embedded model's
    are) load into a pipeline on the GPU and draw what they draw on the CPU; Custom Diffusion's
    closed-form merge runs with the base model on the GPU."""
    from manip.customize import METHODS, Concept, load_customizer
    from manip.customize.base import identifier_tokens
    from manip.customize.custom_diffusion import merge

    prompt = "a photo of {} on the beach"
    concepts = [Concept(name=n, images=np.random.default_rng(i).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8),
                        templates=(prompt,) * 2, class_noun="dog", placeholder=f"<{n}>", identifier=w)
                for i, (n, w) in enumerate((("teapot", "sks"), ("robot", "zwx")))]
    extra = {"search_rounds": 1, "neurons_per_round": 4, "search_batches": 1} if method == "cones" else {}
    cpu, _ = pair()
    with torch.no_grad():
        for c in concepts:
            cpu.text_encoder.get_input_embeddings().weight[identifier_tokens(cpu.tokenizer, c.identifier)] = 0
    blank = copy.deepcopy(cpu)
    folders = []
    for c in concepts[: 2 if method == "custom_diffusion" else 1]:
        trained = METHODS[method](copy.deepcopy(blank), METHODS[method].Config(steps=2, batch_size=2, lr=1e-2, **extra))
        trained.fit([c], tmp_path / f"ckpt-{c.name}")
        folders.append(trained.save(tmp_path / c.name))
    gens = lambda: [torch.Generator().manual_seed(4)]  # noqa: E731
    on_cpu = load_customizer(copy.deepcopy(blank), folders[0])
    on_gpu = load_customizer(copy.deepcopy(blank).to(CUDA), folders[0])
    text = [on_cpu.prompt(concepts[0], prompt)]
    close_images(on_cpu.generate(text, gens(), steps=6), on_gpu.generate(text, gens(), steps=6))
    if method == "custom_diffusion":
        templates, reg = [prompt], ["a photo of a dog on the beach", "a photo of a cat in the snow"]
        merged_cpu = merge(copy.deepcopy(blank), folders, templates, reg)
        merged_gpu = merge(copy.deepcopy(blank).to(CUDA), folders, templates, reg)
        text = [merged_cpu.prompt(concepts[1], prompt)]
        close_images(merged_cpu.generate(text, gens(), steps=6), merged_gpu.generate(text, gens(), steps=6))
