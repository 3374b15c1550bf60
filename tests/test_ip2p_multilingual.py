"""InstructPix2Pix in Russian: the rules backend's edits paired across languages, the stage that
fine-tunes the bilingual student on them and pairs it with the InstructPix2Pix UNet, the
stage that compares Russian and English instructions on the same cases, and the CLI editing
with a Russian instruction on the result."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_params_dict
from PIL import Image
from tiny_pipeline import save_tiny_clip_and_judge, saved_tiny_multilingual

from manip.multilingual import detect_language

ROOT = Path(__file__).resolve().parents[1]
RU_INSTRUCTION = "замени кошку на собаку"


def test_parallel_edits_are_one_edit_in_two_languages(tiny_world):
    from manip.ip2p.bilingual import parallel_edits
    from manip.ip2p.rules import EDIT_KINDS
    from manip.world.dataset import load_split

    scenes = load_split(tiny_world / "test").scenes
    english, russian = parallel_edits(scenes, 3, 21, "test", balanced=True)
    assert len(english) == len(russian) == 21
    assert {e.kind for e in english} == set(EDIT_KINDS)
    for en, ru in zip(english, russian):
        assert (en.id, en.kind, en.truth) == (ru.id, ru.kind, ru.truth)
        assert detect_language(en.edit) == detect_language(en.output) == "en"
        assert detect_language(ru.edit) == detect_language(ru.output) == "ru"
    # The English side is what the English evaluation (stage ip2p_evaluate) edits.
    from manip.ip2p import RulesEditor, world_captions

    alone, _ = RulesEditor(3).edit_all(world_captions(scenes, 3, 21, prefix="test"), balanced=True)
    assert alone == english


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_world) -> Path:
    """A project-shaped folder on the tiny profile with models/{base,multilingual,ip2p,clip,judge}:
    the tiny InstructPix2Pix model is the tiny base's UNet widened to 8 input channels."""
    from diffusers import StableDiffusionPipeline

    from manip.ip2p.finetune import instruct_pipeline, widen_conv_in

    root = tmp_path_factory.mktemp("project")
    params = tiny_params_dict()
    tiny = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    params["ip2p"] = {"evaluate": tiny["ip2p"]["evaluate"]}
    # Enough steps for the held-out error to fall from the student's start.
    params["multilingual"] = {"ip2p": {**tiny["multilingual"]["ip2p"], "n_scenes": 40,
                                       "train": {"steps": 40, "batch_size": 8, "lr": 0.003, "warmup": 1,
                                                 "checkpoint_every": 20}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    (root / "data").mkdir()
    (root / "data" / "world").symlink_to(tiny_world, target_is_directory=True)
    saved_tiny_multilingual(root / "models")
    base = StableDiffusionPipeline.from_pretrained(root / "models" / "base")
    instruct_pipeline(base, widen_conv_in(base.unet)).save_pretrained(root / "models" / "ip2p")
    save_tiny_clip_and_judge(root / "models")
    return root


@pytest.fixture(scope="module")
def trained(project) -> dict:
    from stages import ip2p_multilingual
    from stages.params import load_params

    cwd = os.getcwd()
    os.chdir(project)
    try:
        return ip2p_multilingual.run(load_params("params.yaml"))
    finally:
        os.chdir(cwd)


def test_stage_fine_tunes_the_student_on_instructions_in_both_languages(project, trained):
    assert trained["train_pairs"] == 40 and trained["test_pairs"] == 8
    before, after = trained["test_mse_before"], trained["test_mse_after"]
    assert after["ru"] < before["ru"] and after["en"] < before["en"]
    assert json.loads((project / "metrics" / "ip2p_multilingual.json").read_text()) == trained
    assert (project / "plots" / "ip2p_multilingual_loss.csv").read_text().startswith("step,en,loss,ru")
    # The UNet and VAE are the InstructPix2Pix model's own, stored once.
    folder = project / "models" / "ip2p_multilingual"
    for name in ("unet", "vae"):
        assert (folder / name).is_symlink()
        assert (folder / name).resolve() == (project / "models" / "ip2p" / name).resolve()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionInstructPix2PixPipeline"


def test_a_rerun_resumes_from_the_finished_checkpoint(project, trained, monkeypatch):
    from stages import ip2p_multilingual
    from stages.params import load_params

    monkeypatch.chdir(project)
    again = ip2p_multilingual.run(load_params("params.yaml"))
    # No step ran again: the training time is the first run's, carried in the checkpoint.
    assert again["train_seconds"] == trained["train_seconds"]
    assert again["test_mse_after"] == trained["test_mse_after"]


def test_the_model_takes_a_russian_instruction_from_the_cli(project, trained, tmp_path, capsys):
    from manip.cli import main

    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    common = ["edit", "--method", "instruct-pix2pix", "--image", str(image), "--source", "красная кошка на пляже",
              "--target", "красная собака на пляже", "--instruction", RU_INSTRUCTION, "--settings", '{"steps": 2}']
    assert main([*common, "--model", str(project / "models" / "ip2p_multilingual"),
                 "--out", str(tmp_path / "out.png")]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["outputs"] == [str(tmp_path / "out.png")]
    assert Image.open(tmp_path / "out.png").size == (64, 64)
    # The model fine-tuned under the English encoder still refuses it, by name.
    assert main([*common, "--model", str(project / "models" / "ip2p"), "--out", str(tmp_path / "no.png")]) == 2
    assert "does not read Russian" in capsys.readouterr().err and not (tmp_path / "no.png").exists()


def test_evaluation_compares_russian_and_english_on_the_same_cases(project, trained, monkeypatch):
    from stages import ip2p_evaluate, ip2p_evaluate_multilingual as stage
    from stages.params import load_params

    monkeypatch.chdir(project)
    params = load_params("params.yaml")
    metrics = stage.run(params, progress=False)
    assert set(metrics["scores"]) == set(stage.CONDITIONS) and metrics["n_cases"] == 7
    # The English condition on models/ip2p is ip2p_evaluate's at its default scale: same cases,
    # same noise, same model.
    english = ip2p_evaluate.run(params, progress=False)
    assert metrics["scores"]["ip2p_en"] == english["per_image_guidance"][str(params.ip2p.evaluate.default_image_guidance)]
    scores = metrics["scores"]
    for reference in ("ip2p_en", "ip2p_multilingual_en"):
        diff = metrics[f"vs_{reference}"]["ru_minus_en"]
        success = 100 * (scores["ip2p_multilingual_ru"]["success"] - scores[reference]["success"])
        assert diff["success"] == round(success, 2)
        assert diff["gt_psnr"] == round(scores["ip2p_multilingual_ru"]["gt_psnr"] - scores[reference]["gt_psnr"], 2)
    columns, *rows = Path("plots/ip2p_multilingual_grid_captions.txt").read_text().splitlines()
    assert columns == "columns: input, ground truth, " + ", ".join(stage.CONDITIONS)
    for row in rows:
        english, russian = row.split(": ", 1)[1].split(" | ")
        assert detect_language(english) == "en" and detect_language(russian) == "ru"
    assert json.loads(Path("metrics/ip2p_multilingual_eval.json").read_text()) == metrics
    grid = Image.open("plots/ip2p_multilingual_grid.png")
    assert grid.size == (3 * 64 * (2 + len(stage.CONDITIONS)), 3 * 64 * len(rows))

