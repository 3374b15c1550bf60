"""Stage `customize` in a project-shaped folder with a tiny base model: single and multi-concept
runs (joint, closed-form merge, Cones union), the aggregate metrics and grids, runs skipped once
done, one failing run reported without stopping the others, and bad settings named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import tiny_params_dict
from test_ip2p_stages import stage
from tiny_pipeline import save_tiny_clip_and_judge, saved_tiny_pipeline

FAST = {"steps": 2, "batch_size": 2, "checkpoint_every": 1}
CUSTOMIZE = {
    "concepts": ["teapot", "robot", "mosaic"], "methods": ["textual_inversion", "custom_diffusion", "cones"],
    "n_references": 2, "prior_images": 2, "regularisation_images": 3, "pairs": [["teapot", "robot"]],
    "drift_ablation": False,
    "settings": {"textual_inversion": FAST, "custom_diffusion": FAST,
                 "cones": {**FAST, "search_rounds": 1, "neurons_per_round": 2, "search_batches": 1}},
    "evaluate": {"n_prompts": 2, "images_per_prompt": 2, "steps": 2, "batch_size": 4},
}


def write_params(root: Path, **changes) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump({**tiny_params_dict(), "customize": {**CUSTOMIZE, **changes}}))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("customize") / "project"
    root.mkdir(parents=True)
    write_params(root)
    saved_tiny_pipeline(root / "models" / "base", "epsilon", smooth=True, image_size=64)
    save_tiny_clip_and_judge(root / "models")
    stage(root, "customize")
    return root


def results(root: Path) -> dict[str, dict]:
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text())
            for p in (root / "models" / "concepts").glob("*/*/result.json")}


def test_every_planned_run_has_an_artifact_and_a_result(project):
    runs = results(project)
    singles = {f"{m}/{c}" for m in CUSTOMIZE["methods"] for c in CUSTOMIZE["concepts"]}
    multi = {"custom_diffusion/teapot+robot", "custom_diffusion_merge/teapot+robot", "cones_union/teapot+robot"}
    assert set(runs) == singles | multi
    for name, result in runs.items():
        folder = project / "models" / "concepts" / name
        assert (folder / "customizer.json").is_file() and (folder / "samples.png").is_file()
        assert result["artifact_bytes"] > 0 and result["seconds"] >= 0
    assert (project / "models/concepts/textual_inversion/teapot/learned_embeds.safetensors").is_file()
    assert (project / "models/concepts/custom_diffusion_merge/teapot+robot/"
                      "pytorch_custom_diffusion_weights.safetensors").is_file()
    single = runs["custom_diffusion/teapot"]["scores"]
    assert {"subject_accuracy", "judge_feature_similarity", "clip_i", "clip_t", "scene_accuracy", "kid",
            "drift"} <= set(single)
    assert runs["textual_inversion/teapot"]["scores"]["drift"]["same_seed_clip_i"] == pytest.approx(1.0, abs=1e-4)
    for pair in multi:  # trained together or combined afterwards: the pair, and each concept on its own
        assert {"both_present", "both_in_place", "first_present", "second_present", "first_alone", "second_alone",
                "clip_t"} <= set(runs[pair]["scores"])


def test_each_concept_of_a_joint_model_is_prompted_by_its_own_phrase(project, monkeypatch):
    from manip.customize import load_customizer
    from stages import customize as stage_module
    from stages.params import load_params

    monkeypatch.chdir(project)
    bench = stage_module.Workbench(load_params(project / "params.yaml"))
    joint = load_customizer(bench.base(), project / "models/concepts/custom_diffusion/teapot+robot")
    sampled: list[list[str]] = []
    sample = bench.sample
    monkeypatch.setattr(bench, "sample", lambda customizer, prompts, gens: sampled.append(prompts) or
                        sample(customizer, prompts, gens))
    for name in ("robot", "teapot"):
        sampled.clear()
        stage_module.evaluate_run(bench, joint, stage_module.Run("custom_diffusion", (name,)))
        phrase = joint.phrase(next(c for c in joint.concepts if c.name == name))
        assert all(phrase in p for p in sampled[0]), (name, sampled[0])


def test_aggregate_metrics_and_grids(project):
    metrics = json.loads((project / "metrics/customize.json").read_text())
    assert set(metrics["methods"]) == {*CUSTOMIZE["methods"], "real"}
    assert set(metrics["real"]) == set(CUSTOMIZE["concepts"])
    assert set(metrics["multi_concept"]) == {"custom_diffusion/teapot+robot", "custom_diffusion_merge/teapot+robot",
                                             "cones_union/teapot+robot", "real/teapot+robot", "base/crown+car"}
    for reference in ("real/teapot+robot", "base/crown+car"):  # the pair's ceilings, scored like the runs
        assert set(metrics["multi_concept"][reference]) == {"both_present", "both_in_place", "first_present",
                                                            "second_present", "clip_t"}
    for method in ("textual_inversion", "custom_diffusion", "custom_diffusion_merge", "cones", "cones_union"):
        assert (project / "plots/customize" / f"{method}.png").is_file()


def test_rerun_skips_finished_runs(project):
    before = {name: (project / "models/concepts" / name / "result.json").stat().st_mtime_ns for name in results(project)}
    stage(project, "customize")
    after = {name: (project / "models/concepts" / name / "result.json").stat().st_mtime_ns for name in results(project)}
    assert after == before


def test_a_run_is_keyed_by_the_package_modules_its_method_executes():
    from stages.customize import method_code

    assert method_code("lora") == ["manip/customize/base.py", "manip/customize/concept.py", "manip/customize/lora.py"]
    assert "manip/customize/custom_diffusion.py" in method_code("cones")  # Cones imports its K/V layers from there
    assert not any("lora" in path for method in ("cones", "svdiff", "dreambooth") for path in method_code(method))


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    # The base tokenizer already has the token "<robot>": the runs that would add it must fail
    # (reusing it would retrain whatever it means), the rest must not notice.
    write_params(root, concepts=["teapot", "robot"], methods=["textual_inversion", "custom_diffusion"],
                 pairs=[["teapot", "robot"]])
    saved_tiny_pipeline(root / "models" / "base", "epsilon", smooth=True, image_size=64)
    save_tiny_clip_and_judge(root / "models")
    tokenizer = root / "models/base/tokenizer"
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer)
    tok.add_tokens(["<robot>"])
    tok.save_pretrained(tokenizer)
    proc = stage(root, "customize", check=False)
    assert proc.returncode == 2
    assert "textual_inversion/robot" in proc.stderr and "custom_diffusion/robot" in proc.stderr
    assert "already exist in the tokenizer's vocabulary" in proc.stderr
    done = set(results(root))
    assert {"textual_inversion/teapot", "custom_diffusion/teapot"} <= done
    assert "custom_diffusion_merge/teapot+robot" not in done
    assert not (root / "metrics/customize.json").exists()


def test_unknown_method_setting_is_named(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    write_params(root, settings={"textual_inversion": {"stepz": 3}})
    saved_tiny_pipeline(root / "models" / "base", "epsilon", smooth=True, image_size=64)
    save_tiny_clip_and_judge(root / "models")
    proc = stage(root, "customize", "--run", "textual_inversion/teapot", check=False)
    assert proc.returncode == 2
    assert "customize.settings.textual_inversion: unknown field(s) ['stepz']" in proc.stderr


def test_list_names_the_waves(tmp_path):
    write_params(tmp_path)
    proc = stage(tmp_path, "customize", "--list")
    waves = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["name"] for r in waves[1]] == ["custom_diffusion_merge/teapot+robot", "cones_union/teapot+robot"]
    assert waves[1][0]["needs"] == ["custom_diffusion/teapot", "custom_diffusion/robot"]


def test_elite_encoder_stage_then_a_one_image_elite_run(tiny_world, tmp_path):
    """`elite_encoder` trains the mapping networks on the world's single objects; an `elite` run
    then customizes from the first reference alone, with no training steps."""
    root = tmp_path / "project"
    root.mkdir()
    write_params(root, methods=["elite"], pairs=[], concepts=["teapot"],
                 elite_encoder={"global_steps": 2, "local_steps": 2, "batch_size": 2, "warmup": 1,
                                "checkpoint_every": 1, "n_words": 2, "width": 8, "local_grid": 2})
    (root / "data").mkdir()
    (root / "data" / "world").symlink_to(tiny_world, target_is_directory=True)
    saved_tiny_pipeline(root / "models" / "base", "epsilon", smooth=True, image_size=64)
    save_tiny_clip_and_judge(root / "models")
    missing = stage(root, "customize", "--run", "elite/teapot", check=False)
    assert missing.returncode == 2 and "dvc repro elite_encoder" in missing.stderr
    stage(root, "elite_encoder")
    assert (root / "models/elite_encoder/config.json").is_file()
    assert json.loads((root / "metrics/elite_encoder.json").read_text())["local_steps"] == 2
    stage(root, "customize", "--run", "elite/teapot")
    result = json.loads((root / "models/concepts/elite/teapot/result.json").read_text())
    assert result["trainable_parameters"] == 0 and result["resumed_from"] == 0
    assert (root / "models/concepts/elite/teapot/learned_embeds.safetensors").is_file()


def test_class_image_cache_keeps_strided_images_intact(tmp_path):
    """Decoded samples are a permuted (strided) view; the cache must read back the same pixels."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file

    from stages.customize import save_images

    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).reshape(2, 3, 8, 8).permute(0, 2, 3, 1).numpy()
    assert not images.flags["C_CONTIGUOUS"]
    save_images(tmp_path / "cache.safetensors", images)
    np.testing.assert_array_equal(load_file(str(tmp_path / "cache.safetensors"))["images"], images)
