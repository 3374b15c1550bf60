"""Tiny random-weight Stable Diffusion pipelines of the SD 1.x (eps) and SD 2.x (v-prediction)
kinds, built in memory from the project's own component factories: 32 px images, 16 x 16 x 4
latents, a 32-token CLIP tokenizer. Shared by the sampling, editing and benchmark tests.

Not a conftest fixture on purpose: modules import `tiny_pipeline()` and wrap it in the fixture
scope they need.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel

from manip.models.factory import make_unet, make_vae, text_config
from manip.models.schedulers import sampling_scheduler
from manip.models.tokenizer import TINY_MAX_LENGTH, build_clip_tokenizer

PREDICTION_TYPES = ("epsilon", "v_prediction")


def tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0, smooth: bool = False,
                  image_size: int = 32) -> StableDiffusionPipeline:
    """Same architecture for every seed; the seed only changes the random weights. An
    "epsilon" model is SD-1.x-like, a "v_prediction" one SD-2.x-like (linear projections).

    `image_size` 32 (VAE factor 2) or 64 (factor 4, EmojiWorld's resolution): 16 x 16 latents
    either way.

    `smooth=True` makes the random model behave a little more like a trained one where
    inversion is concerned: the VAE's `scaling_factor` gives unit-variance latents (as SD's
    0.18215 does for its VAE), and the UNet's output layer is scaled down 10x so that the
    prediction changes slowly along a trajectory. Without it a random UNet's prediction is so
    rough that even unguided DDIM inversion misses the image by more than the latents' own
    variance, and no inversion method can be told apart from another.
    """
    torch.manual_seed(seed)
    if image_size not in (32, 64):
        raise ValueError(f"image_size must be 32 or 64, got {image_size}")
    vae = make_vae([8, 16] if image_size == 32 else [8, 16, 16], 1, 4, 8, image_size)
    text = CLIPTextModel(text_config(hidden_size=32, layers=1, heads=2, projection_dim=32))
    # v-prediction models are SD-2.x-like: linear projections in the transformers too.
    unet = make_unet([32, 64], 1, 8, text.config.hidden_size, vae.config.latent_channels, 16,
                     linear_projection=prediction_type == "v_prediction")
    if smooth:
        with torch.no_grad():
            probe = torch.randn(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed)) * 0.5
            vae.register_to_config(scaling_factor=float(1.0 / vae.encode(probe).latent_dist.mode().std()))
            unet.conv_out.weight.mul_(0.1)
            unet.conv_out.bias.mul_(0.1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=build_clip_tokenizer(max_length=TINY_MAX_LENGTH), unet=unet,
        scheduler=sampling_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    for module in (vae, text, unet):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def saved_tiny_pipeline(path: Path, prediction_type: str = "epsilon", seed: int = 0, smooth: bool = False,
                        image_size: int = 32) -> Path:
    """A tiny pipeline written as a diffusers folder (what `from_pretrained` and the CLI read)."""
    tiny_pipeline(prediction_type, seed, smooth, image_size).save_pretrained(path)
    return path


def save_tiny_clip_and_judge(models: Path) -> None:
    """A random-weight evaluator CLIP (with its tokenizer and 64 px image processor) and attribute
    judge under models/clip and models/judge, as the scoring stages load them."""
    from manip.metrics.judge import AttributeJudge
    from manip.models.factory import make_clip
    from manip.models.tokenizer import build_clip_tokenizer
    from stages.evaluator import image_processor

    torch.manual_seed(0)
    clip = make_clip(32, 1, 2, 16, 32, 1, 16, 64)
    clip.save_pretrained(models / "clip")
    build_clip_tokenizer().save_pretrained(models / "clip")
    image_processor(64).save_pretrained(models / "clip")
    AttributeJudge(width=8, image_size=64).eval().save_pretrained(models / "judge")


def saved_tiny_multilingual(models: Path, image_size: int = 64, smooth: bool = False, n_scenes: int = 48) -> Path:
    """A tiny multilingual model under models/multilingual beside its base under models/base:
    a bilingual tokenizer trained on both languages' captions of `n_scenes` train scenes and a
    random-weight student text encoder as wide as the base UNet's cross-attention."""
    from manip.multilingual import all_captions_ru, build_bilingual_tokenizer
    from manip.multilingual.pipeline import save_multilingual_pipeline
    from manip.multilingual.student import make_student
    from manip.world import all_captions, sample_scene, scene_rng

    base = saved_tiny_pipeline(models / "base", smooth=smooth, image_size=image_size)
    scenes = [sample_scene(scene_rng(0, "train", i), "train") for i in range(n_scenes)]
    tokenizer = build_bilingual_tokenizer([c for s in scenes for c in (*all_captions(s), *all_captions_ru(s))],
                                          max_length=TINY_MAX_LENGTH)
    torch.manual_seed(0)
    student = make_student(tokenizer, 32, layers=1, heads=2).eval()
    save_multilingual_pipeline(models / "multilingual", base, tokenizer, student)
    return models / "multilingual"
