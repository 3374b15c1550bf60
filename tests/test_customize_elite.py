"""ELITE on tiny random-weight pipelines at EmojiWorld's 64 px: the encoder trains on the tiny
world's single-object scenes and resumes exactly after a kill, a concept is customized from one
image with no training step, the artifact reproduces the samples in a fresh pipeline, prompts
without the concept sample exactly as the base model, and bad input is refused by name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from tiny_pipeline import saved_tiny_multilingual, tiny_pipeline

from manip.customize import Concept, ConceptError, PriorSet, load_customizer
from manip.customize import elite
from manip.customize.elite import (Elite, EliteConfig, EliteEncoder, EncoderConfig, LocalAttnProcessor,
                                   cross_attention_layers, encode_with_features, single_object_set, train_encoder)
from manip.sampling import generate
from manip.world.dataset import load_split

PROMPTS = ["a photo of <teapot> on the beach", "a photo of a cat on the grass"]
TRAIN = EncoderConfig(global_steps=2, local_steps=2, batch_size=2, warmup=0, checkpoint_every=1, width=16,
                      local_grid=4)


def tiny():
    return tiny_pipeline(image_size=64)


def concept(seed: int = 0, n: int = 1, size: int = 64) -> Concept:
    images = np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    return Concept(name="teapot", images=images, templates=("a photo of {}",) * n, class_noun="crown",
                   placeholder="<teapot>")


def gens() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A saved encoder for the tiny pipeline with random weights everywhere (a fresh one maps
    every image to the same word): what fit does does not depend on the weights being trained."""
    encoder = EliteEncoder.for_pipeline(tiny(), width=16, local_grid=4)
    weights = torch.nn.utils.parameters_to_vector(encoder.parameters())
    noise = torch.randn(weights.shape, generator=torch.Generator().manual_seed(0)) * 0.1
    torch.nn.utils.vector_to_parameters(noise, encoder.parameters())
    path = tmp_path_factory.mktemp("encoder")
    encoder.save_pretrained(path)
    return path


def test_training_set_is_single_base_objects_named_by_the_slot(tiny_world):
    split = load_split(tiny_world / "train")
    images, captions = single_object_set(split)
    kept = [s for s in split.scenes if len(s.objects) == 1]
    assert len(images) == len(captions) == len(kept) > 0 and images.shape[1:] == (64, 64, 3)
    for scene, phrasings in zip(kept, captions):
        assert len(phrasings) == 4
        assert all(c.count("S*") == 1 and scene.objects[0].name not in c for c in phrasings)


def test_encoder_training_resumes_exactly_after_a_kill(tiny_world, tmp_path, monkeypatch):
    images, captions = single_object_set(load_split(tiny_world / "train"))
    whole, whole_report = train_encoder(tiny(), images, captions, TRAIN, tmp_path / "whole")
    assert [row["step"] for row in whole_report.history] == [2, 4] and whole_report.resumed_from == 0
    assert whole.global_maps[0][-1].weight.abs().sum() > 0  # the zero-initialised word layer trained
    first_layer = next(iter(cross_attention_layers(tiny().unet).values()))
    assert not torch.equal(whole.to_k_local[0].weight, first_layer.to_k.weight)  # the local stage moved its copy
    real_loss, calls = elite.diffusion_loss, []

    def killed_at_second_local_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # global steps 1-2, local step 1 (checkpointed), then the kill
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(elite, "diffusion_loss", killed_at_second_local_step)
    with pytest.raises(KeyboardInterrupt):
        train_encoder(tiny(), images, captions, TRAIN, tmp_path / "split")
    monkeypatch.undo()
    pipe = tiny()
    resumed, report = train_encoder(pipe, images, captions, TRAIN, tmp_path / "split")
    assert report.resumed_from == 3 and [row["step"] for row in report.history] == [2, 4]
    expected = whole.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in resumed.state_dict().items())
    # The pipeline's models are untouched and its processors restored.
    base_unet = tiny().unet.state_dict()
    assert all(torch.equal(value, base_unet[key]) for key, value in pipe.unet.state_dict().items())
    assert not any(isinstance(p, LocalAttnProcessor) for p in pipe.unet.attn_processors.values())
    resumed.save_pretrained(tmp_path / "encoder")
    assert sorted(p.name for p in (tmp_path / "encoder").iterdir()) == ["config.json",
                                                                        "diffusion_pytorch_model.safetensors"]
    reloaded = EliteEncoder.from_pretrained(tmp_path / "encoder")
    assert all(torch.equal(value, expected[key]) for key, value in reloaded.state_dict().items())


def test_fit_encodes_one_image_without_training(encoder_dir, tmp_path):
    pipe = tiny()
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    table_before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    processors_before = dict(pipe.unet.attn_processors)
    customizer = Elite(pipe, EliteConfig(encoder=str(encoder_dir)))
    report = customizer.fit([concept()], tmp_path / "ckpt")
    assert report.history == [] and report.trainable_parameters == 0 and report.resumed_from == 0
    assert not (tmp_path / "ckpt").exists()
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[: len(table_before)], table_before)
    encoder = EliteEncoder.from_pretrained(encoder_dir)
    with torch.no_grad():
        word = encoder.words(encode_with_features(tiny(), concept().images)[0])[0, 0]
        other = encoder.words(encode_with_features(tiny(), concept(seed=1).images)[0])[0, 0]
    torch.testing.assert_close(table[pipe.tokenizer.convert_tokens_to_ids("<teapot>")], word, rtol=0, atol=0)
    assert not torch.equal(word, other)
    # Local attention on the cross-attention layers only, installed by module path.
    for name, processor in pipe.unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            assert isinstance(processor, LocalAttnProcessor) and processor.original is processors_before[name]
        else:
            assert processor is processors_before[name]


def test_artifact_reproduces_the_samples_in_a_fresh_pipeline(encoder_dir, tmp_path):
    fitted = Elite(tiny(), EliteConfig(encoder=str(encoder_dir)))
    fitted.fit([concept()], tmp_path / "ckpt")
    before = fitted.generate(PROMPTS, gens(), steps=3)
    fitted.save(tmp_path / "artifact")
    loaded = load_customizer(tiny(), tmp_path / "artifact")
    assert isinstance(loaded, Elite)
    np.testing.assert_array_equal(loaded.generate(PROMPTS, gens(), steps=3), before)
    np.testing.assert_array_equal(loaded.generate(PROMPTS, gens(), steps=3, guidance_scale=1.0),
                                  fitted.generate(PROMPTS, gens(), steps=3, guidance_scale=1.0))
    # The word is a plain textual-inversion file; prompts without the concept run the base model.
    saved = load_file(str(tmp_path / "artifact/learned_embeds.safetensors"))
    assert list(saved) == ["<teapot>"] and saved["<teapot>"].shape == (1, 32)
    np.testing.assert_array_equal(loaded.generate(PROMPTS[1:], gens()[1:], steps=3),
                                  generate(tiny(), PROMPTS[1:], gens()[1:], steps=3))
    # The local features change the concept's samples; lambda = 0 leaves the word alone.
    word_only = Elite(tiny(), EliteConfig(encoder=str(encoder_dir), local_weight=0.0))
    word_only.fit([concept()], tmp_path / "ckpt")
    plain = tiny()
    plain.load_textual_inversion(str(tmp_path / "artifact/learned_embeds.safetensors"))
    word_alone = generate(plain, PROMPTS, gens(), steps=3)
    np.testing.assert_array_equal(word_only.generate(PROMPTS, gens(), steps=3), word_alone)
    assert not np.array_equal(before[0], word_alone[0])


def test_bad_input_is_refused_with_the_reason(encoder_dir, tmp_path):
    config = EliteConfig(encoder=str(encoder_dir))
    with pytest.raises(ConceptError, match="no reference images"):
        Concept(name="empty", images=np.zeros((0, 64, 64, 3), np.uint8), templates=(), class_noun="crown",
                placeholder="<empty>")
    with pytest.raises(ConceptError, match="exactly one reference image, got 2"):
        Elite(tiny(), config).fit([concept(n=2)], tmp_path)
    with pytest.raises(ConceptError, match=r"shape \(N, 64, 64, 3\)"):
        Elite(tiny(), config).fit([concept(size=32)], tmp_path)
    with pytest.raises(ValueError, match="EliteConfig.encoder"):
        Elite(tiny(), EliteConfig()).fit([concept()], tmp_path)
    with pytest.raises(ValueError, match="trained for another pipeline"):
        Elite(tiny_pipeline(image_size=32), config).fit([concept(size=32)], tmp_path)
    # Same shapes, another embedding space: the multilingual student's words are not CLIP's.
    bilingual = StableDiffusionPipeline.from_pretrained(saved_tiny_multilingual(tmp_path / "models"))
    with pytest.raises(ValueError, match="text_encoder: encoder CLIPTextModel, pipeline BertModel"):
        Elite(bilingual, config).fit([concept()], tmp_path / "bilingual")
    with pytest.raises(ValueError, match="prior set has no use"):
        Elite(tiny(), config).fit([concept()], tmp_path, prior=PriorSet(concept().images, ["a crown"]))
    images = concept(n=2).images
    with pytest.raises(ValueError, match="exactly once"):
        train_encoder(tiny(), images, [["a photo of S*"], ["a photo of a cat"]], TRAIN, tmp_path)
    with pytest.raises(ValueError, match="2 images"):
        train_encoder(tiny(), images, [["a photo of S*"]], TRAIN, tmp_path)
    with pytest.raises(ConceptError, match="uint8"):
        train_encoder(tiny(), images.astype(np.float32), [["S*"], ["S*"]], TRAIN, tmp_path)
    for cls, field, value in ((EncoderConfig, "n_words", 0), (EncoderConfig, "slot", "S *"),
                              (EncoderConfig, "lr", 0.0), (EliteConfig, "local_weight", -1.0)):
        with pytest.raises(ValueError, match=f"{cls.__name__}.{field}"):
            cls(**{field: value})
    with pytest.raises(ValueError, match="n_words"):
        EliteEncoder.for_pipeline(tiny(), n_words=5)
