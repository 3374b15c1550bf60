"""Customization methods on tiny random-weight pipelines: every artifact loads into a fresh
pipeline and reproduces the trained model's samples, training resumes exactly, and the
method-specific guarantees (untouched embeddings, the closed-form merge's constraints, sparse
neurons, spectral shifts only) hold."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_pipeline import tiny_pipeline

from manip.customize import METHODS, Concept, ConceptError, PriorSet, load_customizer, load_reference_images
from manip.customize.cones import Cones, read_neurons, union, union_neurons
from manip.customize.custom_diffusion import (WEIGHTS as CD_WEIGHTS, CustomDiffusion, closed_form_merge,
                                              cross_attention_kv, merge, phrase_features)
from manip.customize.svdiff import SVDiff, cut_mix, spectral_layers
from manip.customize.base import IDENTIFIER_FILE, identifier_tokens
from manip.customize.textual_inversion import TextualInversion, class_embedding
from manip.sampling import generate

PROMPT = "a photo of {} on the beach"
TRAINED = [m for m in METHODS if m != "elite"]


def concept(name: str = "teapot", seed: int = 0, placeholder: str = "<teapot>", identifier: str = "sks") -> Concept:
    images = np.random.default_rng(seed).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    return Concept(name=name, images=images, templates=(PROMPT,) * 3, class_noun="dog", placeholder=placeholder,
                   identifier=identifier)


def config(method: str, **kw):
    cls = METHODS[method]
    extra = {"search_rounds": 2, "neurons_per_round": 4, "search_batches": 1} if method == "cones" else {}
    return cls.Config(steps=kw.pop("steps", 4), checkpoint_every=2, batch_size=2, lr=1e-2, **extra, **kw)


def sample(customizer, c: Concept) -> np.ndarray:
    return customizer.generate([customizer.prompt(c, PROMPT)], [torch.Generator().manual_seed(3)], steps=3)


@pytest.mark.parametrize("method", TRAINED)
def test_artifact_reproduces_trained_model(method, tmp_path):
    c = concept()
    trained = METHODS[method](tiny_pipeline(), config(method))
    report = trained.fit([c], tmp_path / "ckpt")
    assert report.history and report.history[-1]["step"] == 4 and report.trainable_parameters > 0
    before = sample(trained, c)
    untrained = generate(tiny_pipeline(), [trained.prompt(c, PROMPT)], [torch.Generator().manual_seed(3)], steps=3)
    assert not np.array_equal(before, untrained)
    trained.save(tmp_path / "artifact")
    manifest = json.loads((tmp_path / "artifact/customizer.json").read_text())
    assert manifest["method"] == method and manifest["concepts"][0]["phrase"] == trained.phrase(c)
    loaded = load_customizer(tiny_pipeline(), tmp_path / "artifact")
    assert type(loaded) is type(trained)
    np.testing.assert_array_equal(sample(loaded, c), before)


@pytest.mark.parametrize("method", ["textual_inversion", "lora", "cones"])
def test_interrupted_run_resumes_to_the_same_result(method, tmp_path):
    c = concept()
    whole = METHODS[method](tiny_pipeline(), config(method))
    whole.fit([c], tmp_path / "whole")
    first = METHODS[method](tiny_pipeline(), config(method))
    step_loss = first.batch_loss

    def killed_at_step_2(step: int, stream: int = 0):
        if step == 2 and stream == 0:
            raise KeyboardInterrupt
        return step_loss(step, stream)

    first.batch_loss = killed_at_step_2
    with pytest.raises(KeyboardInterrupt):
        first.fit([c], tmp_path / "split")
    resumed = METHODS[method](tiny_pipeline(), config(method))
    report = resumed.fit([c], tmp_path / "split")
    assert report.resumed_from == 2
    np.testing.assert_array_equal(sample(resumed, c), sample(whole, c))


def test_textual_inversion_leaves_every_other_embedding_unchanged(tmp_path):
    pipe = tiny_pipeline()
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    start = class_embedding(pipe, concept().class_noun)  # where the new rows begin
    ti = TextualInversion(pipe, TextualInversion.Config(steps=4, batch_size=2, lr=0.5, n_vectors=2))
    ti.fit([concept()], tmp_path / "ckpt")
    after = pipe.text_encoder.get_input_embeddings().weight
    assert after.shape[0] == before.shape[0] + 2
    assert torch.equal(after[: before.shape[0]], before)
    assert (after[-2:] != start).any(1).all()  # both new vectors trained
    ti.save(tmp_path / "ti")
    saved = load_file(str(tmp_path / "ti/learned_embeds.safetensors"))
    assert list(saved) == ["<teapot>"] and saved["<teapot>"].shape == (2, after.shape[1])
    fresh = tiny_pipeline()
    fresh.load_textual_inversion(str(tmp_path / "ti/learned_embeds.safetensors"))  # diffusers' own loader
    assert fresh.maybe_convert_prompt("a <teapot>", fresh.tokenizer) == "a <teapot> <teapot>_1"
    prompt, gen = [PROMPT.format("<teapot>")], lambda: [torch.Generator().manual_seed(1)]
    np.testing.assert_array_equal(generate(fresh, prompt, gen(), steps=3), ti.generate(prompt, gen(), steps=3))


@pytest.mark.parametrize("placeholder", ["dog", "teapot"])
def test_placeholder_already_in_vocabulary_is_refused(placeholder, tmp_path):
    """A CLIP vocabulary holds whole words as `word</w>` ("teapot" only so): the bare word is
    taken all the same."""
    pipe = tiny_pipeline()
    assert "teapot" not in pipe.tokenizer.get_vocab() and "teapot</w>" in pipe.tokenizer.get_vocab()
    with pytest.raises(ConceptError, match="already exist"):
        TextualInversion(pipe, config("textual_inversion")).fit([concept(placeholder=placeholder)], tmp_path)


def untrained_identifiers(*words: str):
    """A tiny pipeline whose text encoder never saw `words`: their rows are zero, as every unseen
    word's is in the embedded model."""
    pipe = tiny_pipeline()
    with torch.no_grad():
        for w in words:
            pipe.text_encoder.get_input_embeddings().weight[identifier_tokens(pipe.tokenizer, w)] = 0
    return pipe


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_untrained_identifiers_get_rows_of_their_own_and_the_artifact_carries_them(method, tmp_path):
    pair = [concept("teapot", 0), concept("robot", 1, placeholder="<robot>", identifier="zwx")]
    pipe = untrained_identifiers("sks", "zwx")
    trained = METHODS[method](pipe, config(method))
    trained.fit(pair, tmp_path / "ckpt")
    table = pipe.text_encoder.get_input_embeddings().weight
    sks, zwx = (table[identifier_tokens(pipe.tokenizer, w)] for w in ("sks", "zwx"))
    assert sks.any(1).all() and zwx.any(1).all() and not torch.equal(sks[0], zwx[0])
    trained.save(tmp_path / "artifact")
    assert sorted(p.name for p in (tmp_path / "artifact").glob("identifier-*")) == [
        IDENTIFIER_FILE.format("sks"), IDENTIFIER_FILE.format("zwx")]
    loaded = load_customizer(untrained_identifiers("sks", "zwx"), tmp_path / "artifact")
    for c in pair:
        np.testing.assert_array_equal(sample(loaded, c), sample(trained, c))
    if method == "lora":  # plain diffusers: the LoRA file, and each identifier as a textual inversion
        plain = untrained_identifiers("sks", "zwx")
        plain.load_lora_weights(tmp_path / "artifact")
        for w in ("sks", "zwx"):
            plain.load_textual_inversion(str(tmp_path / "artifact" / IDENTIFIER_FILE.format(w)), token=w)
        prompt = [trained.prompt(pair[0], PROMPT)]
        np.testing.assert_allclose(generate(plain, prompt, [torch.Generator().manual_seed(3)], steps=3),
                                   sample(trained, pair[0]), atol=2e-5)


def test_an_identifier_gets_the_same_row_beside_another_concept_as_alone():
    """Rows bound for one concept do not enter the statistics another's row is drawn from."""
    def bound(concepts: list[Concept]) -> dict[str, torch.Tensor]:
        lora = METHODS["lora"](untrained_identifiers("sks", "zwx"), config("lora"))
        lora.concepts = concepts
        lora.bind_identifiers()
        return lora.bound_identifiers

    robot = concept("robot", 1, placeholder="<robot>", identifier="zwx")
    torch.testing.assert_close(bound([concept(), robot])["zwx"], bound([robot])["zwx"], atol=0, rtol=0)


def test_trained_identifier_rows_are_left_alone(tmp_path):
    """A model that did train the identifier's row (any real Stable Diffusion) keeps it."""
    pipe = tiny_pipeline()
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    lora = METHODS["lora"](pipe, config("lora"))
    lora.fit([concept()], tmp_path / "ckpt")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, before)
    lora.save(tmp_path / "artifact")
    assert not list((tmp_path / "artifact").glob("identifier-*"))


@pytest.mark.parametrize("identifier_lr", [1e-2, 0.0])
def test_dreambooth_trains_the_identifier_rows_it_bound_and_no_other(identifier_lr, tmp_path):
    pipe = untrained_identifiers("sks")
    table = pipe.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    db = METHODS["dreambooth"](pipe, config("dreambooth", identifier_lr=identifier_lr))
    db.fit([concept()], tmp_path / "ckpt")
    sks = identifier_tokens(pipe.tokenizer, "sks")
    others = torch.ones(len(table), dtype=torch.bool)
    others[sks] = False
    assert torch.equal(table[others], before[others])
    bound = db.bound_identifiers["sks"]
    assert torch.equal(table[sks], bound) == (identifier_lr == 0)  # trained, or fixed at the value it was given
    real = tiny_pipeline()  # every row trained, as in a real Stable Diffusion: the paper's fixed identifier
    real_before = real.text_encoder.get_input_embeddings().weight.detach().clone()
    METHODS["dreambooth"](real, config("dreambooth")).fit([concept()], tmp_path / "ckpt-real")
    assert torch.equal(real.text_encoder.get_input_embeddings().weight, real_before)


def test_dreambooth_prior_preservation_adds_the_class_loss(tmp_path):
    prior = PriorSet(np.random.default_rng(5).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8),
                     ["a photo of a dog on the beach"] * 4)
    db = METHODS["dreambooth"](tiny_pipeline(), config("dreambooth"))
    report = db.fit([concept()], tmp_path / "ckpt", prior=prior)
    row = report.history[-1]
    assert {"instance", "prior"} <= set(row)
    assert row["loss"] == pytest.approx(row["instance"] + row["prior"], rel=1e-5)


def test_diffusers_load_attn_procs_ignores_custom_diffusion_weights(tmp_path):
    """What diffusers' documented `unet.load_attn_procs(folder, weight_name=...)` does with a
    Custom Diffusion file: it builds the processors but only installs them when given the
    private `_pipeline` argument, so the UNet silently stays the base model; with `_pipeline`
    it refuses a file that holds only the cross-attention layers. Hence the project's loader."""
    c = concept()
    cd = CustomDiffusion(tiny_pipeline(), config("custom_diffusion"))
    cd.fit([c], tmp_path / "ckpt")
    cd.save(tmp_path / "cd")
    fresh = tiny_pipeline()
    base_kv = {k: m.weight.clone() for k, m in cross_attention_kv(fresh.unet).items()}
    fresh.unet.load_attn_procs(tmp_path / "cd", weight_name=CD_WEIGHTS)
    assert {type(p).__name__ for p in fresh.unet.attn_processors.values()} != {"CustomDiffusionAttnProcessor"}
    assert all(torch.equal(m.weight, base_kv[k]) for k, m in cross_attention_kv(fresh.unet).items())
    with pytest.raises(ValueError, match="number of processors"):
        fresh.unet.load_attn_procs(tmp_path / "cd", weight_name=CD_WEIGHTS, _pipeline=fresh)


def test_closed_form_merge_meets_its_constraints_and_stays_close_on_regularisation():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(16, 12, generator=g)
    c = torch.randn(3, 12, generator=g)
    v = torch.randn(16, 3, generator=g)
    c_reg = torch.randn(200, 12, generator=g)
    w = closed_form_merge(w0, c, v, c_reg, ridge=0.0)
    torch.testing.assert_close(w @ c.T, v, atol=1e-4, rtol=1e-4)
    # Any other W meeting the constraint moves the regularisation outputs more.
    null = torch.linalg.svd(c).Vh[3:]  # directions orthogonal to the constrained keys
    other = w + torch.randn(16, len(null), generator=g) @ null * 0.1
    torch.testing.assert_close(other @ c.T, v, atol=1e-4, rtol=1e-4)
    drift = lambda m: torch.linalg.norm((m - w0) @ c_reg.T)  # noqa: E731
    assert drift(w) < drift(other)


def test_closed_form_merge_of_repeated_keys_is_the_merge_of_the_distinct_ones():
    """A phrase's keys repeat across templates, exactly or up to rounding: the merge must treat
    them as the distinct keys, not meet their rounding-level differences with large weights."""
    g = torch.Generator().manual_seed(0)
    w0, w_concept = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    c_reg = torch.randn(300, 8, generator=g) @ torch.randn(8, 32, generator=g)  # spans 8 of 32 directions
    c = torch.randn(4, 32, generator=g)
    repeated = torch.cat([c] + [c + s * torch.randn(4, 32, generator=g) for s in (1e-6, 1e-7, 0.0, 1e-8)])
    w = closed_form_merge(w0, repeated, w_concept @ repeated.T, c_reg)
    torch.testing.assert_close(w @ repeated.T, w_concept @ repeated.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w, closed_form_merge(w0, c, w_concept @ c.T, c_reg), atol=1e-4, rtol=1e-4)


def test_merge_of_two_custom_diffusion_concepts(tmp_path):
    concepts = [concept("teapot", 0, "<new1>"), concept("robot", 1, "<new2>", "zwx")]
    for c in concepts:
        cd = CustomDiffusion(tiny_pipeline(), config("custom_diffusion"))
        cd.fit([c], tmp_path / f"ckpt-{c.name}")
        cd.save(tmp_path / c.name)
    base = tiny_pipeline()
    reg = [f"a photo of a {o} on the {b}" for o in ("dog", "cat", "tree", "car") for b in ("beach", "grass", "snow")]
    merged = merge(base, [tmp_path / "teapot", tmp_path / "robot"], [PROMPT], reg)
    assert [c.name for c in merged.concepts] == ["teapot", "robot"]
    for c in concepts:
        own = load_customizer(tiny_pipeline(), tmp_path / c.name)
        keys = phrase_features(base, [merged.prompt(c, PROMPT)], merged.phrase(c))
        for name, module in cross_attention_kv(base.unet).items():
            wanted = cross_attention_kv(own.pipe.unet)[name].weight @ keys.T
            assert torch.linalg.norm(module.weight @ keys.T - wanted) < 1e-3 * torch.linalg.norm(wanted)
    merged.save(tmp_path / "merged")
    reloaded = load_customizer(tiny_pipeline(), tmp_path / "merged")
    np.testing.assert_array_equal(sample(reloaded, concepts[1]), sample(merged, concepts[1]))


def test_svdiff_stores_only_spectral_shifts_and_trains_two_subjects_with_cut_mix_unmix(tmp_path):
    a, b = concept("teapot", 0, "<a>", "sks"), concept("robot", 1, "<b>", "zwx")
    sv = SVDiff(tiny_pipeline(), config("svdiff"))
    report = sv.fit([a, b], tmp_path / "ckpt")
    assert "unmix" in report.history[-1] and report.history[-1]["unmix"] > 0
    sv.save(tmp_path / "sv")
    shifts = load_file(str(tmp_path / "sv/spectral_shifts.safetensors"))
    layers = spectral_layers(tiny_pipeline().unet)
    assert len(shifts) == len(layers)
    assert all(v.ndim == 1 and len(v) == min(layers[k.replace("/", ".")].weight.flatten(1).shape)
               for k, v in shifts.items())
    assert sum(v.numel() for v in shifts.values()) < sum(m.weight.numel() for m in layers.values()) / 20
    left, right = a.images[0], b.images[0]
    mixed = cut_mix(left, right)
    assert np.array_equal(mixed[:, :16], left[:, :16]) and np.array_equal(mixed[:, 16:], right[:, 16:])


def test_cones_neurons_are_sparse_and_combine_by_union(tmp_path):
    for c in (concept("teapot", 0), concept("robot", 1, identifier="zwx")):
        cones = Cones(tiny_pipeline(), config("cones"))
        cones.fit([c], tmp_path / f"ckpt-{c.name}")
        assert 0 < cones.neuron_count <= 2 * 4
        cones.save(tmp_path / c.name)
    parts = [read_neurons(tmp_path / n) for n in ("teapot", "robot")]
    combined = union(tiny_pipeline(), [tmp_path / "teapot", tmp_path / "robot"])
    assert [c.name for c in combined.concepts] == ["teapot", "robot"]
    channels = lambda part, k: set(part[k][0].tolist()) if k in part else set()  # noqa: E731
    counts = {k: len(channels(parts[0], k) | channels(parts[1], k)) for k in set(parts[0]) | set(parts[1])}
    assert {k: len(i) for k, (i, _) in combined.neurons.items()} == counts
    shared = union_neurons([{"l": (torch.tensor([1, 2]), torch.tensor([0.5, 2.0]))},
                            {"l": (torch.tensor([2, 3]), torch.tensor([3.0, 0.0]))}])
    assert shared["l"][0].tolist() == [1, 2, 3] and shared["l"][1].tolist() == [0.5, 6.0, 0.0]


def test_reference_images_are_normalised_and_bad_ones_named(tmp_path):
    Image.new("RGBA", (80, 40), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("L", (20, 30), 128).save(tmp_path / "grey.png")
    Image.new("P", (64, 64)).save(tmp_path / "palette.gif")
    images = load_reference_images([tmp_path / "clear.png", tmp_path / "grey.png", tmp_path / "palette.gif"], 32)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert (images[0] == 255).all()  # a transparent image composites onto white
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ConceptError, match="broken.png is not an image file"):
        load_reference_images([tmp_path / "grey.png", tmp_path / "broken.png"], 32)
    with pytest.raises(ConceptError, match="no image file at .*missing.png"):
        load_reference_images([tmp_path / "missing.png"], 32)
    with pytest.raises(ConceptError, match="no reference images"):
        load_reference_images([], 32)
    with pytest.raises(ConceptError, match="has no reference images"):
        Concept(name="x", images=np.zeros((0, 32, 32, 3), np.uint8), templates=(), class_noun="dog", placeholder="<x>")
    with pytest.raises(ConceptError, match="exactly one"):
        Concept(name="x", images=np.zeros((1, 32, 32, 3), np.uint8), templates=("no slot",), class_noun="dog",
                placeholder="<x>")


def test_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="n_vectors"):
        TextualInversion.Config(n_vectors=0)
    with pytest.raises(ValueError, match="steps"):
        METHODS["lora"].Config(steps=0)
    with pytest.raises(ValueError, match="cutmix_template"):
        SVDiff.Config(cutmix_template="{} only")
