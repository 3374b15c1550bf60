"""manip.sampling matches diffusers' own StableDiffusionPipeline on tiny random-weight models
of the SD 1.x (eps) and SD 2.x (v-prediction) kinds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from manip.models.tokenizer import TINY_MAX_LENGTH
from manip.prompts import PromptError
from manip.sampling import generate
from tiny_pipeline import tiny_pipeline

PROMPTS = ["a red cat on the left, on the beach at sunset", "a photo of a dog in the center, in the snow at night"]
STEPS, GUIDANCE = 3, 7.5


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def pipe(request, tmp_path_factory) -> StableDiffusionPipeline:
    """Saved to disk and reloaded with nothing but diffusers, as any downstream tool would."""
    path = tmp_path_factory.mktemp(f"sd-{request.param}")
    tiny_pipeline(request.param).save_pretrained(path)
    loaded = StableDiffusionPipeline.from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.prediction_type == request.param
    assert loaded.unet.config.use_linear_projection == (request.param == "v_prediction")  # SD-2.x-like
    assert loaded.tokenizer.model_max_length == TINY_MAX_LENGTH
    return loaded


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def reference(pipe: StableDiffusionPipeline, prompts, seeds, steps: int = STEPS) -> np.ndarray:
    out = pipe(prompt=list(prompts), generator=generators(*seeds), num_inference_steps=steps,
               guidance_scale=GUIDANCE, output_type="np").images
    return (np.asarray(out) * 255).round().astype(np.uint8)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_generate_matches_pipeline_call(pipe):
    ours = generate(pipe, PROMPTS, generators(1, 2), steps=STEPS, guidance_scale=GUIDANCE)
    ref = reference(pipe, PROMPTS, (1, 2))
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (2, 32, 32, 3)
    assert max_diff(ours, ref) <= 1
    # The comparison is not vacuous: images have content, and depend on prompt and noise.
    assert ours.std() > 1.0
    assert max_diff(ours[0], ours[1]) > 1
    other_noise = generate(pipe, PROMPTS, generators(3, 4), steps=STEPS, guidance_scale=GUIDANCE)
    assert max_diff(ours, other_noise) > 1
    assert max_diff(ours, reference(pipe, PROMPTS, (1, 2), steps=STEPS + 1)) > 1


def test_generate_is_per_prompt(pipe):
    """One generator per prompt: an image does not depend on what else is in the batch."""
    both = generate(pipe, PROMPTS, generators(1, 2), steps=STEPS, guidance_scale=GUIDANCE)
    alone = generate(pipe, PROMPTS[1:], generators(2), steps=STEPS, guidance_scale=GUIDANCE)
    assert max_diff(both[1:], alone) <= 1


def test_over_long_prompt_raises(pipe):
    prompt = " ".join(["cat"] * 40)
    n = len(pipe.tokenizer(prompt).input_ids)
    assert n > TINY_MAX_LENGTH
    with pytest.raises(PromptError, match=rf"\b{n} tokens\b.*{TINY_MAX_LENGTH}"):
        generate(pipe, [PROMPTS[0], prompt], generators(1, 2), steps=1)
    # A prompt exactly at the limit is accepted.
    at_limit = " ".join(["cat"] * (TINY_MAX_LENGTH - 2))
    assert len(pipe.tokenizer(at_limit).input_ids) == TINY_MAX_LENGTH
    generate(pipe, [at_limit], generators(1), steps=1, guidance_scale=1.0)


def test_generator_count_must_match(pipe):
    with pytest.raises(ValueError, match="one generator per prompt"):
        generate(pipe, PROMPTS, generators(1), steps=1)
    with pytest.raises(ValueError, match="one generator per prompt"):
        generate(pipe, PROMPTS[:1], generators(1, 2), steps=1)
