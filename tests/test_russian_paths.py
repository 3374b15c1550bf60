"""Russian prompts through every editing and customization path, on a tiny multilingual model
(bilingual tokenizer, random student text encoder): Prompt-to-Prompt word swaps and their token
alignment, ё spelt either way, the single-image editors' identifiers, each customization method
trained and sampled from Russian prompts, and the clear errors for prompts that cannot be read."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from tiny_pipeline import saved_tiny_multilingual, tiny_pipeline

from manip.customize import METHODS, Concept, ConceptError, load_customizer
from manip.editing.edit import edit_inverted
from manip.editing.inversion import invert
from manip.editing.p2p import P2PConfig
from manip.editing.single import EDITORS, PartCache, make_config, prepare_request
from manip.editing.tokens import AlignmentError, equalizer, replace_mapper, word_spans
from manip.multilingual import LanguageError
from manip.prompts import read_prompts

SOURCE = "красная кошка слева на пляже ночью"
TARGET = "красная собака слева на пляже ночью"
TRAINED = [m for m in METHODS if m != "elite"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return saved_tiny_multilingual(tmp_path_factory.mktemp("models"), image_size=32, smooth=True)


def load(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(folder) -> StableDiffusionPipeline:
    return load(folder)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)


# --- token alignment ---------------------------------------------------------------------------

def test_a_russian_word_swap_maps_the_swapped_word_and_keeps_the_rest(pipe):
    tok = pipe.tokenizer
    src, tgt = word_spans(tok, SOURCE), word_spans(tok, TARGET)
    m = replace_mapper(tok, SOURCE, TARGET)
    for i, ((sa, sb), (ta, tb)) in enumerate(zip(src.spans, tgt.spans)):
        block = m[sa:sb, ta:tb]
        assert torch.allclose(block.sum(0), torch.ones(tb - ta)), src.words[i]
        assert m[:, ta:tb].sum() == tb - ta  # no other source token feeds the word
    assert src.words[1] == "кошка" and tgt.words[1] == "собака"


def test_a_swap_to_a_word_the_tokenizer_splits_spreads_the_source_map(pipe):
    """A word the tokenizer never learnt whole (крокодил is not in EmojiWorld) is several
    pieces; each takes the mean map of the swapped source word's pieces."""
    tok = pipe.tokenizer
    target = "красная крокодил слева на пляже ночью"
    (sa, sb), (ta, tb) = word_spans(tok, SOURCE).spans[1], word_spans(tok, target).spans[1]
    assert tb - ta > 1
    m = replace_mapper(tok, SOURCE, target)
    assert torch.allclose(m[sa:sb, ta:tb], torch.full((sb - sa, tb - ta), 1.0 / (sb - sa)))
    with pytest.raises(AlignmentError, match="same number of words"):
        replace_mapper(tok, SOURCE, "красная кошка и собака слева на пляже ночью")


def test_yo_is_read_as_ye_in_prompts_and_in_edit_words(pipe):
    tok = pipe.tokenizer
    folded = read_prompts(tok, ["зелёная кошка на пляже"])[0]
    assert folded == "зеленая кошка на пляже"
    eq = equalizer(tok, folded, {"зелёная": 2.0})
    assert eq[word_spans(tok, folded).tokens_of("зеленая")].eq(2.0).all() and eq.sum() == tok.model_max_length + 1


# --- Prompt-to-Prompt on real images ---------------------------------------------------------------

def test_russian_prompt_to_prompt_edits_and_yo_spellings_edit_nothing(pipe, image):
    inversion = invert(pipe, image, "зеленая кошка слева на пляже ночью", "ddim", steps=4)
    reconstruction, same, swapped = edit_inverted(
        pipe, inversion, ["зелёная кошка слева на пляже ночью", "зеленая собака слева на пляже ночью"],
        P2PConfig(edit="replace"))
    # The same prompt spelt with ё is the same tokens, so the "edit" is the reconstruction.
    np.testing.assert_array_equal(same, reconstruction)
    assert np.abs(swapped.astype(int) - reconstruction.astype(int)).mean() > 0


@pytest.mark.parametrize("edit", [["--edit", "replace"], ["--edit", "refine"], ["--edit", "reweight", "--reweight", "ночью=2"]])
def test_cli_edits_with_russian_prompts(folder, image, tmp_path, capsys, edit):
    from manip.cli import main

    Image.fromarray(image).save(tmp_path / "in.png")
    target = TARGET if edit[1] != "refine" else f"{SOURCE}, набросок карандашом"
    code = main(["edit", "--model", str(folder), "--image", str(tmp_path / "in.png"), "--source", SOURCE,
                 "--target", target, "--inversion", "ddim", "--steps", "3", *edit, "--out", str(tmp_path / "out.png")])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["outputs"] == [str(tmp_path / "out.png")]
    assert Image.open(tmp_path / "out.png").size == (32, 32)


def test_cli_refuses_a_mixed_target_before_inverting(folder, image, tmp_path, capsys):
    from manip.cli import main

    Image.fromarray(image).save(tmp_path / "in.png")
    code = main(["edit", "--model", str(folder), "--image", str(tmp_path / "in.png"), "--source", SOURCE,
                 "--target", "красная dog слева на пляже ночью", "--out", str(tmp_path / "out.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: prompt 2" in err and "mixes English words ['dog']" in err
    assert not (tmp_path / "out.png").exists()


# --- single-image editors ------------------------------------------------------------------------

def test_unitune_takes_russian_prompts_with_its_identifier(pipe, image, tmp_path):
    """UniTune prepends its rare-token identifier (`sks`) to Russian prompts: the identifier
    names what it learnt in either language, so the prompt is not mixed."""
    editor = EDITORS["unitune"](pipe, make_config("unitune", {"tune": {"steps": 2, "lr": 1e-4, "batch": 1}}),
                                PartCache(tmp_path / "cache"))
    request, _ = prepare_request(pipe, image, SOURCE, "зелёная кошка слева на пляже ночью", seed=0)
    assert request.target == "зеленая кошка слева на пляже ночью"
    out = editor.edit(request)
    assert out.image.shape == (32, 32, 3)
    with pytest.raises(LanguageError, match="prompt 2 .*mixes"):
        prepare_request(pipe, image, SOURCE, "a cat слева", seed=0)


# --- customization -------------------------------------------------------------------------------

def russian_concept(identifier: str = "sks") -> Concept:
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    return Concept(name="teapot", images=images, templates=("{} на пляже днем", "{} в городе ночью"),
                   class_noun="crown", class_noun_ru="корона", placeholder="<teapot>", identifier=identifier)


@pytest.mark.parametrize("method", TRAINED)
def test_customization_trains_and_samples_from_russian_prompts(method, folder, tmp_path):
    c = russian_concept()
    cls = METHODS[method]
    extra = {"search_rounds": 2, "neurons_per_round": 4, "search_batches": 1} if method == "cones" else {}
    trained = cls(load(folder), cls.Config(steps=2, checkpoint_every=2, batch_size=2, lr=1e-2, **extra))
    trained.fit([c], tmp_path / "ckpt")
    prompt = trained.prompt(c, "{} на снегу на закате")
    phrase = {"textual_inversion": "<teapot>", "custom_diffusion": "<teapot> корона"}.get(method, "sks корона")
    assert prompt == f"{phrase} на снегу на закате"
    assert trained.prompt(c, "a {} in the snow") == f"a {trained.phrase(c)} in the snow"  # English still works
    draw = [torch.Generator().manual_seed(1)]
    before = trained.generate([prompt], draw, steps=2)
    trained.save(tmp_path / "artifact")
    loaded = load_customizer(load(folder), tmp_path / "artifact")
    np.testing.assert_array_equal(loaded.generate([prompt], [torch.Generator().manual_seed(1)], steps=2), before)
    if method == "dreambooth":  # a pipeline folder: its identifier stands in a Russian prompt on the CLI too
        from manip.cli import main

        out = tmp_path / "cli.png"
        assert main(["generate", "--model", str(tmp_path / "artifact"), "--prompt", prompt, "--steps", "2",
                     "--out", str(out)]) == 0 and out.is_file()


def test_svdiff_cut_mix_captions_follow_the_template_language(folder, tmp_path):
    """Cut-Mix-Unmix with a Russian template writes both subjects in Russian, and its unmix
    term finds their tokens in those captions."""
    from manip.customize.svdiff import SVDiff

    robot = Concept(name="robot", images=russian_concept().images[::-1].copy(), templates=("{} на траве",) * 2,
                    class_noun="robot", class_noun_ru="робот", placeholder="<robot>", identifier="zwx")
    sv = SVDiff(load(folder), SVDiff.Config(steps=2, checkpoint_every=2, batch_size=2, lr=1e-2,
                                            cutmix_template="{} слева и {} справа"))
    report = sv.fit([russian_concept(), robot], tmp_path / "ckpt")
    assert report.history[-1]["unmix"] > 0
    assert set(sv._mixed.captions) == {"sks корона слева и zwx робот справа", "zwx робот слева и sks корона справа"}
    with pytest.raises(LanguageError, match="mixes"):
        SVDiff.Config(cutmix_template="{} слева and {} on the right")


def test_custom_diffusion_merge_with_russian_templates(folder, tmp_path):
    """The closed-form merge constrains each concept's keys in every template's language: the
    merged weights give the Russian phrase's keys the values its own weights gave them."""
    from manip.customize.custom_diffusion import cross_attention_kv, merge, phrase_features

    concepts = [russian_concept(), Concept(name="robot", images=russian_concept().images, templates=("{} на траве",) * 2,
                                           class_noun="robot", class_noun_ru="робот", placeholder="<robot>")]
    for c in concepts:
        cd = METHODS["custom_diffusion"](load(folder), METHODS["custom_diffusion"].Config(
            steps=2, checkpoint_every=2, batch_size=2, lr=1e-2))
        cd.fit([c], tmp_path / f"ckpt-{c.name}")
        cd.save(tmp_path / c.name)
    base = load(folder)
    template = "{} на снегу ночью"
    merged = merge(base, [tmp_path / c.name for c in concepts], [template, "a {} in the snow"],
                   ["красная кошка на пляже", "a red cat on the beach", "зеленое дерево в городе"])
    for c in concepts:
        own = load_customizer(load(folder), tmp_path / c.name)
        phrase = merged.phrase(c, "ru")
        assert merged.prompt(c, template) == template.format(phrase)
        keys = phrase_features(base, [template.format(phrase)], phrase)
        for name, module in cross_attention_kv(base.unet).items():
            wanted = cross_attention_kv(own.pipe.unet)[name].weight @ keys.T
            assert torch.linalg.norm(module.weight @ keys.T - wanted) < 1e-3 * torch.linalg.norm(wanted)


def test_concept_templates_that_cannot_be_read_are_refused(folder, tmp_path):
    lora = METHODS["lora"](load(folder), METHODS["lora"].Config(steps=1))
    with pytest.raises(LanguageError, match="mixes English words"):
        lora.fit([Concept(name="teapot", images=np.zeros((1, 32, 32, 3), np.uint8), templates=("a {} на пляже",),
                          class_noun="crown", class_noun_ru="корона", placeholder="<teapot>")], tmp_path / "a")
    with pytest.raises(ConceptError, match="no Russian class noun"):
        lora.fit([Concept(name="teapot", images=np.zeros((1, 32, 32, 3), np.uint8), templates=("{} на пляже",),
                          class_noun="crown", placeholder="<teapot>")], tmp_path / "b")


def test_an_english_model_refuses_a_russian_instruction_by_name(image):
    """InstructPix2Pix edits with a model fine-tuned under the English encoder: a Russian
    instruction is refused before any work, not drawn from byte pieces."""
    with pytest.raises(LanguageError, match="prompt 3 .*does not read Russian"):
        prepare_request(tiny_pipeline(), image, "a red cat on the beach", "a red dog on the beach",
                        instruction="замени кошку на собаку")
