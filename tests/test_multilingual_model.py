"""The multilingual model: the student text encoder distilled from a tiny random teacher, exact
resume, the saved diffusers folder (Russian prompt end to end, identical to precomputed
embeddings), the language check at the prompt boundary, and both stages on a temp project."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import CLIPTextModel

from conftest import tiny_params_dict
from manip.models.factory import text_config
from manip.models.tokenizer import TINY_MAX_LENGTH, build_clip_tokenizer
from manip.multilingual import LanguageError, all_captions_ru, build_bilingual_tokenizer
from manip.multilingual.distill import caption_set, distill, distillation_error
from manip.prompts import read_prompts
from manip.multilingual.student import copy_teacher_embeddings, make_student, token_ids
from manip.multilingual.tokenizer import MIN_VOCAB_SIZE
from manip.training.loop import LoopConfig
from manip.world import all_captions, sample_scene, scene_rng
from tiny_pipeline import save_tiny_clip_and_judge, saved_tiny_multilingual, saved_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 32
RU_PROMPT = "красная кошка слева на пляже ночью"


class Killed(RuntimeError):
    """Stands in for the process being killed in the middle of a step."""


@pytest.fixture(scope="module")
def captions() -> tuple[list[list[str]], list[list[str]]]:
    scenes = [sample_scene(scene_rng(0, "train", i), "train") for i in range(48)]
    return [all_captions(s) for s in scenes], [all_captions_ru(s) for s in scenes]


@pytest.fixture(scope="module")
def tokenizers(captions):
    english, russian = captions
    texts = [c for phrasings in (*english, *russian) for c in phrasings]
    return build_bilingual_tokenizer(texts, max_length=TINY_MAX_LENGTH), build_clip_tokenizer(max_length=TINY_MAX_LENGTH)


@pytest.fixture(scope="module")
def teacher() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(text_config(hidden_size=WIDTH, layers=1, heads=2, projection_dim=WIDTH)).eval()


@pytest.fixture(scope="module")
def data(captions, tokenizers):
    return caption_set(*captions, *tokenizers)


def student(tokenizers, seed: int = 0):
    torch.manual_seed(seed)
    return make_student(tokenizers[0], WIDTH, layers=1, heads=2)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- student and data ------------------------------------------------------------------------------

def test_caption_ids_are_padded_as_the_pipeline_pads(captions, tokenizers, data):
    english, russian = captions
    tokenizer, teacher_tokenizer = tokenizers
    assert data.student_ru.shape == (48, 4, TINY_MAX_LENGTH)
    assert torch.equal(data.student_ru[5], token_ids(tokenizer, russian[5]))
    assert torch.equal(data.teacher_en[7], token_ids(teacher_tokenizer, english[7]))
    with pytest.raises(ValueError, match="over the tokenizer limit"):
        caption_set([["cat " * 40]], [["кошка"]], tokenizer, teacher_tokenizer)
    with pytest.raises(ValueError, match="as many English as Russian"):
        caption_set([["a cat", "a dog"]], [["кошка"]], tokenizer, teacher_tokenizer)


def test_student_is_bidirectional_and_mask_free(tokenizers):
    """A later word changes the features at earlier positions (the causal teacher cannot do
    that), and diffusers gets no attention mask from the config."""
    model = student(tokenizers).eval()
    assert model.config.use_attention_mask is False
    ids = token_ids(tokenizers[0], ["красная кошка слева", "красная кошка справа"])
    with torch.no_grad():
        out = model(ids)[0]
    assert not torch.allclose(out[0, 1], out[1, 1])


def test_teacher_rows_are_copied_for_shared_tokens(tokenizers, teacher):
    tokenizer, teacher_tokenizer = tokenizers
    model = student(tokenizers)
    copied = copy_teacher_embeddings(model, tokenizer, teacher, teacher_tokenizer)
    shared = set(tokenizer.get_vocab()) & set(teacher_tokenizer.get_vocab())
    assert copied == len(shared) > 300  # the byte tokens, English words
    rows = model.get_input_embeddings().weight
    source = teacher.get_input_embeddings().weight
    assert torch.equal(rows[tokenizer.convert_tokens_to_ids("cat</w>")],
                       source[teacher_tokenizer.convert_tokens_to_ids("cat</w>")])
    assert torch.equal(model.embeddings.position_embeddings.weight,
                       teacher.embeddings.position_embedding.weight[:TINY_MAX_LENGTH])


# --- distillation ----------------------------------------------------------------------------------

def test_distillation_loss_drops_in_both_languages(tmp_path, tokenizers, teacher, data):
    model = student(tokenizers)
    before = distillation_error(model, teacher, data)
    cfg = LoopConfig(steps=40, lr=3e-3, warmup=4, checkpoint_every=100, log_every=10)
    result = distill(model, teacher, data, cfg, batch_size=8, seed=0, checkpoint_dir=tmp_path / "ckpt")
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < 0.6 * first["loss"], result.history
    after = distillation_error(result.model, teacher, data)
    for key in ("en", "ru", "empty_prompt"):
        assert after[key] < 0.6 * before[key], (key, before, after)
    assert after["target_variance"] == pytest.approx(before["target_variance"])
    assert teacher.embeddings.token_embedding.weight.grad is None  # the teacher stays frozen
    # The end-of-text token, which is also the pad token, ends every caption: its row trains.
    eos = tokenizers[0].eos_token_id
    assert eos == tokenizers[0].pad_token_id
    initial = student(tokenizers).get_input_embeddings().weight.detach()
    assert not torch.equal(result.model.get_input_embeddings().weight[eos], initial[eos])


def test_interrupted_distillation_resumes_exactly(tmp_path, tokenizers, teacher, data):
    cfg = LoopConfig(steps=6, lr=3e-3, warmup=2, checkpoint_every=2, log_every=3)
    straight = distill(student(tokenizers), teacher, data, cfg, 4, 0, tmp_path / "straight")

    victim = student(tokenizers)
    calls = []

    def kill_at_step_5(module, args):
        calls.append(1)
        if len(calls) == 5:
            raise Killed("killed in step 5")

    victim.register_forward_pre_hook(kill_at_step_5)
    with pytest.raises(Killed):
        distill(victim, teacher, data, cfg, 4, 0, tmp_path / "resumed")
    resumed = distill(student(tokenizers, seed=99), teacher, data, cfg, 4, 0, tmp_path / "resumed")
    assert resumed.resumed_from == 4
    expected = state(straight.model)
    assert all(torch.equal(expected[k], v) for k, v in state(resumed.model).items())
    assert resumed.history == straight.history


# --- the pipeline folder ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return saved_tiny_multilingual(tmp_path_factory.mktemp("models"))


def test_folder_links_the_base_unet_and_vae(saved):
    for name in ("unet", "vae"):
        assert (saved / name).is_symlink() and os.readlink(saved / name) == f"../base/{name}"
    assert not any(p.name.startswith(".") for p in saved.parent.iterdir())  # no staging leftovers
    index = json.loads((saved / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"]


def test_russian_prompt_runs_end_to_end_with_plain_diffusers(saved):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from manip.sampling import encode_prompts

    pipe = StableDiffusionPipeline.from_pretrained(saved, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.text_encoder).__name__ == "BertModel"
    base_unet = UNet2DConditionModel.from_pretrained(saved.parent / "base" / "unet")
    assert torch.equal(pipe.unet.conv_out.weight, base_unet.conv_out.weight)  # read through the link

    def draw(**kwargs) -> np.ndarray:
        return pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                    **kwargs).images

    image = draw(prompt=RU_PROMPT)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    embeds, negative = encode_prompts(pipe, [RU_PROMPT]), encode_prompts(pipe, [""])
    assert np.array_equal(image, draw(prompt_embeds=embeds, negative_prompt_embeds=negative))
    prompt_embeds, _ = pipe.encode_prompt(RU_PROMPT, "cpu", 1, False)
    assert torch.equal(prompt_embeds, embeds)  # the project's sampler conditions as diffusers does


# --- prompts ---------------------------------------------------------------------------------------

def test_mixed_or_unsupported_prompts_fail_with_the_reason(saved):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(saved / "tokenizer")
    assert read_prompts(tokenizer, ["a red cat", "желтая ёлка", ""]) == ["a red cat", "желтая елка", ""]
    # Words the tokenizer never learnt whole split into many pieces; the model still reads Russian.
    assert read_prompts(tokenizer, ["белый медведь на льду"]) == ["белый медведь на льду"]
    with pytest.raises(LanguageError, match=r"prompt 2 \('a red кошка'\): .*mixes English words"):
        read_prompts(tokenizer, ["a dog", "a red кошка"])
    with pytest.raises(LanguageError, match="unsupported script"):
        read_prompts(tokenizer, ["一只猫"])
    # A concept's identifier names it in either language; elsewhere it is an English word.
    assert read_prompts(tokenizer, ["sks корона на пляже"], placeholders={"sks"}) == ["sks корона на пляже"]
    with pytest.raises(LanguageError, match=r"English words \['sks'\]"):
        read_prompts(tokenizer, ["sks корона на пляже"])


def test_cli_refuses_a_mixed_prompt_before_loading_a_model(saved, tmp_path, capsys):
    from manip.cli import main

    code = main(["generate", "--model", str(saved), "--prompt", "кошка on the beach",
                 "--out", str(tmp_path / "x.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompt 1") and "write it in one language" in err
    assert not (tmp_path / "x.png").exists()


def test_cli_generates_from_a_russian_prompt(saved, tmp_path, capsys):
    from manip.cli import main

    assert main(["generate", "--model", str(saved), "--prompt", RU_PROMPT, "--steps", "2",
                 "--out", str(tmp_path / "cat.png")]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == [str(tmp_path / "cat.png")]
    assert (tmp_path / "cat.png").is_file()
    # The English-only base model is refused a Russian prompt, and still takes an English one.
    base = saved.parent / "base"
    assert main(["generate", "--model", str(base), "--prompt", RU_PROMPT, "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert "does not read Russian" in err and str(base) in err and not (tmp_path / "b.png").exists()
    assert main(["generate", "--model", str(base), "--prompt", "a red cat on the beach", "--steps", "2",
                 "--out", str(tmp_path / "b.png")]) == 0


# --- params and stages -----------------------------------------------------------------------------

def test_params_bounds(tmp_path):
    from stages.params import MultilingualEvalParams, ParamsError, StudentParams, load_params

    assert StudentParams.model_fields["vocab_size"].metadata[0].ge == MIN_VOCAB_SIZE
    assert MultilingualEvalParams().n_scenes == 200
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"multilingual": {"evaluate": {"images_per_scene": 1}}}))
    with pytest.raises(ParamsError, match="multilingual.evaluate.images_per_scene"):
        load_params(tmp_path / "p.yaml")


@pytest.fixture
def project(tmp_path, tiny_world) -> Path:
    """A project-shaped folder: params.yaml with the tiny multilingual section, the tiny world,
    models/{base,clip,judge}."""
    params = tiny_params_dict()
    params["multilingual"] = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())["multilingual"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "world").symlink_to(tiny_world, target_is_directory=True)
    saved_tiny_pipeline(tmp_path / "models" / "base", image_size=64)
    save_tiny_clip_and_judge(tmp_path / "models")
    return tmp_path


def test_stages_end_to_end_on_the_tiny_profile(project, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from stages import evaluate_multilingual, multilingual
    from stages.params import load_params

    monkeypatch.chdir(project)
    params = load_params("params.yaml")
    trained = multilingual.run(params)
    assert set(trained["test_mse"]) == {"en", "ru", "empty_prompt", "target_variance"}
    assert trained["seed"] == params.seed and trained["student"]["teacher_rows_copied"] > 0
    assert json.loads(Path("metrics/multilingual.json").read_text()) == trained
    assert Path("plots/multilingual_loss.csv").read_text().startswith("step,en,loss,ru")
    assert (Path("checkpoints/multilingual/last/meta.json")).is_file()
    pipe = StableDiffusionPipeline.from_pretrained("models/multilingual")
    pipe.set_progress_bar_config(disable=True)
    assert pipe(RU_PROMPT, num_inference_steps=1, output_type="np").images.shape == (1, 64, 64, 3)

    metrics = evaluate_multilingual.run(params)
    assert set(metrics["scores"]) == {"base_en", "multilingual_en", "multilingual_ru"}
    for reference in ("vs_multilingual_en", "vs_base_en"):
        diff = metrics[reference]["ru_minus_en_points"]
        assert set(diff) == {"object", "background", "all", "clip_t"}
        assert all(metrics[reference]["within_5_points"][k] == (abs(v) <= 5) for k, v in diff.items())
    assert set(metrics["consistency"]) == {"en_vs_ru_same_seed", "en_vs_en_other_seed",
                                           "base_en_vs_multilingual_en_same_seed"}
    assert all(-1 <= v <= 1 for v in metrics["consistency"].values())
    assert json.loads(Path("metrics/multilingual_eval.json").read_text()) == metrics
    assert Path("plots/multilingual_grid.png").is_file()
    assert "|" in Path("plots/multilingual_grid_captions.txt").read_text().splitlines()[1]
