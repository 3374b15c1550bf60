"""Single-image editing methods (Imagic, UniTune, SINE, pix2pix-zero) and the baselines behind
one interface, on tiny random pipelines: outputs, cached parts and their reuse, determinism,
resume of an interrupted fine-tune, the base model left untouched, bad input, the CLI and the
`edit_runs` stage end to end."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from manip.editing.single import EDITORS, PartCache, make_config, prepare_request
from manip.editing.single.base import Holder, TuneConfig, fit
from manip.editing.single.pix2pix_zero import autocorrelation_loss, kl_loss
from manip.ip2p.finetune import instruct_pipeline, widen_conv_in
from llm_server import ScriptedLLM, pairs_reply, serve
from manip.prompts import PromptError
from tiny_pipeline import save_tiny_clip_and_judge, saved_tiny_multilingual, saved_tiny_pipeline, tiny_pipeline

from conftest import tiny_params_dict

ROOT = Path(__file__).resolve().parents[1]
TUNE = {"steps": 3, "lr": 1e-4, "batch": 2}
SETTINGS = {
    "imagic": {"embed": TUNE, "tune": TUNE, "steps": 4},
    "unitune": {"tune": TUNE, "steps": 4},
    "sine": {"tune": TUNE, "steps": 4, "patch_size": 24},
    "pix2pix-zero": {"steps": 4, "reg_steps": 2},
    "p2p": {"steps": 4, "null_text_inner_steps": 2},
    "instruct-pix2pix": {"steps": 4},
}
# Parts that depend only on the image (and source caption): reused by an edit toward another target.
TARGET_FREE = {"imagic": set(), "unitune": {"finetune"}, "sine": {"finetune"},
               "pix2pix-zero": {"inversion", "reference"}, "p2p": {"inversion-null-text"}, "instruct-pix2pix": set()}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(smooth=True)


@pytest.fixture(scope="module")
def ip2p_pipe(pipe):
    ip2p = instruct_pipeline(pipe, widen_conv_in(copy.deepcopy(pipe.unet))).to("cpu")
    ip2p.set_progress_bar_config(disable=True)
    return ip2p


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    yy, xx = np.mgrid[0:32, 0:32]
    img = np.stack([xx * 8, yy * 8, np.full_like(xx, 90)], -1).astype(np.uint8)
    img[8:20, 10:22] = (230, 40, 40)
    return img


def request(pipe, image, target="a blue ball on the grass", instruction="make the ball blue", **kw):
    req, notes = prepare_request(pipe, image, "a red ball on the grass", target, instruction=instruction, **kw)
    assert notes == []
    return req


def editor(name, pipe, ip2p_pipe, cache):
    return EDITORS[name](ip2p_pipe if name == "instruct-pix2pix" else pipe, make_config(name, SETTINGS[name]), cache)


def state_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_editor_outputs_cache_reuse_and_determinism(name, pipe, ip2p_pipe, image, tmp_path):
    before = state_digest(pipe.unet)
    first = editor(name, pipe, ip2p_pipe, PartCache(tmp_path / "a"))
    out = first.edit(request(pipe, image))
    assert out.image.shape == (32, 32, 3) and out.image.dtype == np.uint8
    assert (out.reconstruction is None) == (name == "instruct-pix2pix")
    assert set(out.seconds) == set(out.cached) | {"edit"} and not any(out.cached.values())
    if name == "instruct-pix2pix":
        assert out.stored_bytes == 0 and out.cached == {}
    else:
        assert out.stored_bytes > 0

    # The same request again: every part from the cache, the same bytes out.
    again = first.edit(request(pipe, image))
    assert all(again.cached.values())
    assert np.array_equal(again.image, out.image)

    # Another target: only the parts that do not depend on it are reused.
    other = first.edit(request(pipe, image, target="a red ball in the snow", instruction="put it in the snow"))
    assert {k for k, hit in other.cached.items() if hit} == TARGET_FREE[name]
    assert not np.array_equal(other.image, out.image)

    # A fresh cache elsewhere reproduces the edit exactly.
    fresh = editor(name, pipe, ip2p_pipe, PartCache(tmp_path / "b")).edit(request(pipe, image))
    assert np.array_equal(fresh.image, out.image)
    if out.reconstruction is not None:
        assert np.array_equal(fresh.reconstruction, out.reconstruction)
    assert state_digest(pipe.unet) == before  # per-image fine-tunes train a copy


def test_methods_run_on_a_v_prediction_model(image, tmp_path):
    """SD 2.x-style models: fine-tunes train on the velocity, samplers convert it to noise."""
    vpipe = tiny_pipeline("v_prediction", smooth=True)
    for name in ("imagic", "unitune", "sine", "pix2pix-zero"):
        out = editor(name, vpipe, None, PartCache(tmp_path)).edit(request(vpipe, image))
        assert out.image.shape == (32, 32, 3) and out.reconstruction.shape == (32, 32, 3)
        assert np.isfinite(out.image.astype(float)).all() and out.image.std() > 0


def test_base_model_on_disk_is_never_modified(tmp_path, image):
    from diffusers import StableDiffusionPipeline

    model = saved_tiny_pipeline(tmp_path / "base", "epsilon", smooth=True)
    files = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model.rglob("*")) if p.is_file()}
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    for name in ("imagic", "unitune", "sine"):
        editor(name, pipe, None, PartCache(tmp_path / "parts")).edit(request(pipe, image))
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model.rglob("*")) if p.is_file()} == files


def test_interrupted_fine_tune_resumes_to_the_same_weights(pipe, image, tmp_path):
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.zeros(1, 8, 32)

    def run(ckpt, stop_at=None):
        holder = Holder(context)
        calls = []

        def loss(gen, rng):
            calls.append(1)
            if stop_at is not None and len(calls) == stop_at:
                raise KeyboardInterrupt
            from manip.editing.single.base import denoising_loss

            return denoising_loss(pipe, pipe.unet, z0.expand(2, -1, -1, -1), holder.value, gen)

        fit(holder, loss, TuneConfig(steps=8, lr=1e-2, batch=2), 0, ckpt, "test", {"t": 1})
        return holder.value.detach().clone(), len(calls)

    straight, n = run(tmp_path / "straight")
    assert n == 8
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", stop_at=6)  # checkpoints every 2 steps: step 4 is on disk
    resumed, n = run(tmp_path / "killed")
    assert n == 4
    torch.testing.assert_close(resumed, straight)


def test_imagic_eta_sweep_reuses_stages_one_and_two(pipe, image, tmp_path):
    imagic = editor("imagic", pipe, None, PartCache(tmp_path))
    out = imagic.edit_sweep(request(pipe, image), [0.0, 0.7, 1.0])
    sweep = out.extras["sweep"]
    assert sweep.shape == (3, 32, 32, 3)
    assert np.array_equal(sweep[0], out.reconstruction) and np.array_equal(sweep[1], out.image)
    again = imagic.edit_sweep(request(pipe, image), [0.3])
    assert again.cached == {"embedding": True, "finetune": True}


def test_unitune_blend_covers_the_steps_it_runs(pipe, image, tmp_path):
    """Blending every step of a half-schedule run at weight 1 pins it to the noised input, so
    it ends on the input's own latents."""
    from manip.metrics.image_quality import psnr

    cfg = make_config("unitune", {"tune": TUNE, "steps": 10, "start": 0.5, "blend_until": 1.0, "blend_weight": 1.0})
    ed = EDITORS["unitune"](pipe, cfg, PartCache(tmp_path))
    out = ed.edit(request(pipe, image))
    assert psnr(out.image, ed.decode(ed.latents(image))[0]) > 30


def test_sine_edits_at_another_resolution(pipe, image, tmp_path):
    settings = {**SETTINGS["sine"], "resolution": 48}
    out = EDITORS["sine"](pipe, make_config("sine", settings), PartCache(tmp_path)).edit(request(pipe, image))
    assert out.image.shape == (48, 48, 3) and out.reconstruction.shape == (48, 48, 3)
    with pytest.raises(ValueError, match="multiples of the VAE factor"):
        EDITORS["sine"](pipe, make_config("sine", {**settings, "resolution": 47}), PartCache(tmp_path)).edit(
            request(pipe, image))


def test_pix2pix_zero_regularisation_whitens_the_noise():
    gen = torch.Generator().manual_seed(0)
    white = torch.randn(1, 4, 16, 16, generator=gen)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(1, 4, 32, 32, generator=gen), 2, 1, padding=0)[..., :16, :16] * 3
    assert autocorrelation_loss(smooth, torch.Generator().manual_seed(1)) > 3 * autocorrelation_loss(
        white, torch.Generator().manual_seed(1))
    assert kl_loss(smooth) > kl_loss(white)


def test_pix2pix_zero_inversion_retraces_to_the_input(pipe, image, tmp_path):
    """Unregularised, unguided: the reference pass from the inverted noise lands back on the
    input's latents (the inversion runs the DDIM ODE the sampler runs, backwards)."""
    cfg = make_config("pix2pix-zero", {"steps": 20, "reg_steps": 0, "guidance_scale": 1.0})
    ed = EDITORS["pix2pix-zero"](pipe, cfg, PartCache(tmp_path))
    z0, cond = ed.latents(image), ed.text(["a red ball on the grass"])
    x_T = ed.invert(z0, cond, 0)
    back = ed.reference(x_T, cond, ed.text([""]))["latents"]
    assert (x_T - z0).norm() > 0.5 * z0.norm()
    assert (back - z0).norm() < 0.1 * z0.norm()


def test_pix2pix_zero_direction_and_attention_guidance_matter(pipe, image, tmp_path):
    def edit(settings, sentences=None):
        cfg = make_config("pix2pix-zero", {**SETTINGS["pix2pix-zero"], **settings})
        return EDITORS["pix2pix-zero"](pipe, cfg, PartCache(tmp_path)).edit(request(pipe, image, sentences=sentences))

    base = edit({"xa_guidance": 20.0})
    assert not np.array_equal(base.image, edit({"xa_guidance": 0.0}).image)
    sets = (("a red ball on the grass", "a red ball in the snow"), ("a blue ball on the grass", "a blue ball in the snow"))
    assert not np.array_equal(base.image, edit({"xa_guidance": 20.0}, sets).image)
    none = edit({"direction_scale": 0.0, "xa_guidance": 0.0})
    assert np.array_equal(none.image, none.reconstruction)  # no direction, no guidance: the source pass


def test_bad_input_is_refused_by_name(pipe, ip2p_pipe, image, tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        prepare_request(pipe, image, "a red ball", "  ")
    with pytest.raises(PromptError, match="over the tokenizer limit"):
        prepare_request(pipe, image, "a red ball", " ".join(["ball"] * 80))
    with pytest.raises(ValueError, match=r"unknown settings \['bogus'\]"):
        make_config("imagic", {"bogus": 1})
    with pytest.raises(ValueError, match="unknown editing method"):
        make_config("edict")
    with pytest.raises(ValueError, match="eta"):
        make_config("imagic", {"eta": 3})
    with pytest.raises(ValueError, match="steps >= 1"):
        make_config("unitune", {"tune": {"steps": 0, "lr": 1e-4}})
    ed = editor("unitune", pipe, None, PartCache(tmp_path))
    req = request(pipe, image)
    with pytest.raises(ValueError, match="uint8 32x32x3"):
        ed.edit(type(req)(**{**req.__dict__, "image": image[:16]}))
    with pytest.raises(ValueError, match="has none"):
        editor("instruct-pix2pix", pipe, ip2p_pipe, PartCache(tmp_path)).edit(
            type(req)(**{**req.__dict__, "instruction": None}))
    with pytest.raises(ValueError, match="at least one sentence"):
        editor("pix2pix-zero", pipe, None, PartCache(tmp_path)).edit(
            type(req)(**{**req.__dict__, "sentences": ((), ("x",))}))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        ed.edit(req)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    from manip.editing.images import ImageInputError

    with pytest.raises(ImageInputError):
        prepare_request(pipe, bad, "a", "b")


def test_damaged_cached_part_is_recomputed(pipe, image, tmp_path):
    cache = PartCache(tmp_path)
    ed = editor("unitune", pipe, None, cache)
    out = ed.edit(request(pipe, image))
    (part,) = list(tmp_path.rglob("*.safetensors"))
    part.write_bytes(b"junk")
    again = ed.edit(request(pipe, image))
    assert again.cached == {"finetune": False} and np.array_equal(again.image, out.image)


def test_cli_edits_with_each_method_and_reuses_the_cache(tmp_path):
    model = saved_tiny_pipeline(tmp_path / "base", "epsilon", smooth=True)
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    env = dict(os.environ, MANIP_THREADS="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "manip.cli", "edit", "--model", str(model), "--image",
                               str(tmp_path / "in.png"), "--source", "a red ball", "--target", "a blue ball", *args],
                              env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)

    settings = json.dumps({"tune": TUNE, "steps": 3})
    first = cli("--method", "unitune", "--settings", settings, "--cache", str(tmp_path / "parts"),
                "--out", str(tmp_path / "u.png"))
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["cached"] == [{"finetune": False}] and Image.open(tmp_path / "u.png").size == (32, 32)
    second = cli("--method", "unitune", "--settings", settings, "--cache", str(tmp_path / "parts"),
                 "--out", str(tmp_path / "u2.png"))
    assert json.loads(second.stdout)["cached"] == [{"finetune": True}]
    sweep = cli("--method", "imagic", "--settings", json.dumps({"embed": TUNE, "tune": TUNE, "steps": 3}),
                "--etas", "0.5,1.0", "--out", str(tmp_path / "i.png"))
    assert sweep.returncode == 0, sweep.stderr
    assert [Path(p).name for p in json.loads(sweep.stdout)["sweep"]] == ["i_eta0.5.png", "i_eta1.0.png"]
    bad = cli("--method", "sine", "--settings", '{"bogus": 1}', "--out", str(tmp_path / "s.png"))
    assert bad.returncode == 2 and "unknown settings ['bogus']" in bad.stderr and "Traceback" not in bad.stderr
    junk = cli("--method", "sine", "--settings", "{not json", "--out", str(tmp_path / "s.png"))
    assert junk.returncode == 2 and "--settings" in junk.stderr


# ---------------------------------------------------------------- the stage, end to end


@pytest.fixture
def runs_dir(tmp_path, tiny_world, ip2p_pipe) -> Path:
    """A project-shaped folder: params.yaml with the tiny edit_runs section and a Prompt-to-Prompt
    run in Russian, the tiny world, and models/{base,ip2p,multilingual,clip,judge}."""
    params = tiny_params_dict()
    params["edit_runs"] = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())["edit_runs"]
    params["edit_runs"]["n_cases"] = 6
    params["edit_runs"]["limit_per_run"] = 20
    params["edit_runs"]["runs"]["p2p-ru"] = {"method": "p2p", "model": "multilingual", "language": "ru",
                                             "settings": {"inversion": "ddim"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "world").symlink_to(tiny_world, target_is_directory=True)
    saved_tiny_multilingual(tmp_path / "models", smooth=True, image_size=64)
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tmp_path / "models" / "base", safety_checker=None,
                                                   requires_safety_checker=False)
    instruct_pipeline(base, widen_conv_in(copy.deepcopy(base.unet))).save_pretrained(tmp_path / "models" / "ip2p")
    save_tiny_clip_and_judge(tmp_path / "models")
    return tmp_path


def test_edit_runs_stage_end_to_end_and_resume(runs_dir, monkeypatch):
    from manip.editing.benchmark import KINDS
    from stages.edit_runs import run
    from stages.params import load_params

    monkeypatch.chdir(runs_dir)
    params = load_params("params.yaml")
    labels = list(params.edit_runs.runs)
    total = 6 * len(labels)
    first = run(params, progress=False)
    assert first["complete"] is False and first["shards"] == {"done": 20, "remaining": total - 20}

    full = params.model_copy(update={"edit_runs": params.edit_runs.model_copy(update={"limit_per_run": None})})
    metrics = run(full, progress=False)
    assert metrics["complete"] is True and metrics["shards"] == {"done": total, "remaining": 0}
    assert json.loads(Path("metrics/edit_runs.json").read_text()) == json.loads(json.dumps(metrics))
    for label in labels:
        overall = metrics["results"][label]["overall"]
        assert overall["n"] == 6 and set(metrics["results"][label]["by_kind"]) == set(KINDS)
        for key in ("success", "gt_psnr_in", "clip_t", "prepare_seconds", "edit_seconds", "peak_memory_mb",
                    "stored_bytes"):
            assert isinstance(overall[key], float), (label, key)
    assert metrics["results"]["instruct-pix2pix"]["overall"]["recon_psnr"] is None
    assert metrics["runs"]["p2p-ru"]["language"] == "ru" and metrics["results"]["p2p-ru"]["overall"]["n"] == 6
    assert metrics["results"]["unitune"]["overall"]["stored_bytes"] > 1e5
    # The first case was edited twice; the second edit reused the fine-tune.
    reuse = metrics["reuse"]
    assert set(reuse) == set(labels) and all(v["n"] == 1 for v in reuse.values())
    shard = json.loads(next(Path("data/edit_runs/unitune").glob("*.json")).read_text())
    assert {"fingerprint", "case", "metrics", "part_seconds"} <= set(shard)
    seconds = [json.loads(p.read_text()) for p in Path("data/edit_runs/unitune").glob("*.json")]
    assert sum("second_edit" in s for s in seconds) == 1
    assert next(s for s in seconds if "second_edit" in s)["second_edit"]["cached"] == {"finetune": True}
    assert not list(Path("data/edit_runs").glob(".parts/*/*"))  # parts go once a case is done

    for kind in KINDS:
        grid = Image.open(f"plots/edit_runs/{kind}.png")
        assert grid.size == ((2 + len(labels)) * 64 * 3, 64 * 3)
    rows = Path("plots/edit_runs_cases.csv").read_text().splitlines()
    assert len(rows) == total + 1

    before = {p: p.stat().st_mtime_ns for p in Path("data/edit_runs").rglob("*.json")}
    again = run(full, progress=False)
    assert again["results"] == metrics["results"]
    assert {p: p.stat().st_mtime_ns for p in Path("data/edit_runs").rglob("*.json")} == before

    # pix2pix-zero's sentence sets from an LLM instead of the scene grammar: only its shards are
    # recomputed, with one request per distinct edit.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    llm = ScriptedLLM(reply=pairs_reply)
    with serve(llm) as url:
        s = full.edit_runs.sentences
        sentences = s.model_copy(update={"backend": "openai", "n": 4, "openai": s.openai.model_copy(
            update={"base_url": url, "cache_dir": str(runs_dir / "llm")})})
        run(full.model_copy(update={"edit_runs": full.edit_runs.model_copy(update={"sentences": sentences})}),
            progress=False)
    redone = {p.parent.name for p, t in before.items() if p.stat().st_mtime_ns != t}
    assert redone == {"pix2pix-zero"}
    assert len(llm.log) == len({entry["caption"] for entry in llm.log}) == 6 + 1  # cases + one second edit


def test_edit_runs_params_are_checked_before_models_load(tmp_path, monkeypatch):
    from stages.edit_runs import run
    from stages.params import ParamsError, load_params

    monkeypatch.chdir(tmp_path)
    params = tiny_params_dict()
    params["edit_runs"] = {"runs": {"x": {"method": "imagic", "settings": {"eta": 9}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match="eta"):
        run(load_params("params.yaml"), progress=False)
    params["edit_runs"] = {"runs": {"x": {"method": "edict"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="edit_runs.runs.x.method"):
        load_params("params.yaml")
    params["edit_runs"] = {"runs": {"x": {"method": "imagic", "model": "ip2p"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="imagic edits with model 'base'"):
        load_params("params.yaml")
    params["edit_runs"] = {"runs": {"x": {"method": "p2p", "language": "ru"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="Russian prompts need the multilingual model"):
        load_params("params.yaml")
    params["edit_runs"] = {"runs": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="at least one run"):
        load_params("params.yaml")
