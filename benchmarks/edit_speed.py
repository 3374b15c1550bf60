"""Real-image editing, manip vs the diffusers community pipelines: seconds and reconstruction.

Two tasks on the same model, the same EmojiWorld test renders (scenes an object edit applies
to: the source caption and the edited caption have the same words but one, so P2P `replace`
applies) and the same step counts, the two implementations run alternately (the order flips
every run) so that machine drift hits both alike:

- null-text: null-text inversion (DDIM inversion + per-step null-embedding optimisation, the
  same inner-step count, learning-rate schedule and early-stop rule on both sides) and the
  guided reconstruction from it. Ours: `manip.editing.inversion.invert(..., "null-text")` +
  `manip.sampling.denoise`. Peer: `NullTextPipeline.invert` + `NullTextPipeline.__call__` from
  examples/community/pipeline_null_text_inversion.py.
- ddim+p2p: plain DDIM inversion, then a Prompt-to-Prompt replace edit [source, target] from
  the inverted noise (cross-attention replaced for 80% of the steps, self-attention for 40%).
  Ours: `invert(..., "ddim")` + `manip.editing.edit.edit_inverted`. Peer: the DDIM inversion
  loop of `NullTextPipeline` + `Prompt2PromptPipeline.__call__(latents=x_T)` from
  examples/community/pipeline_prompt2prompt.py.
- null-text, ours batched: every image inverted in one `invert_batch` call and reconstructed in
  one batch (how the benchmark and dataset stages run it), seconds per image, against the same
  per-image peer runs as the null-text task. The peer has no batched form.
- null-text, ours at a higher rate: ours one image at a time with the initial Adam rate
  `--fast-lr` (3e-2; the reference and the peer use 1e-2), which meets the early-stop level in
  fewer inner steps, timed in the same alternation and against the same peer runs as the
  null-text task; its reconstruction PSNR says whether the speed cost any quality.

Reported per task and implementation: median seconds per image for the inversion and for the
sampling, reconstruction PSNR of the source image against the input (and against the VAE's own
reconstruction, the best any inversion can do), the peer / ours time ratio, and the largest
pixel difference between the two implementations' outputs (for ddim+p2p they compute the same
thing, so it should be a few grey levels at most). Writes benchmarks/results/edit_speed.json.

The peers are imported from their files with importlib (never copied). Adaptations, each the
least that makes them run on this project's models, all in this file:

1. `NullTextPipeline.image2latent` scales latents by a hard-coded 0.18215 (SD 1.x's VAE), while
   its own `__call__` decodes with `vae.config.scaling_factor`; the override encodes with
   `vae.config.scaling_factor` (the embedded VAE's factor is about 4, not 0.18). Reading the
   image from a path and taking the latent mean are kept.
2. `NullTextPipeline.invert` caches the null embeddings as `<image path>.pt` and, when that file
   exists, `torch.load`s it instead of optimising. Every peer run gets a fresh image path and the
   cache file is deleted afterwards, so nothing is ever loaded from it and each run optimises.
3. The P2P alignment helpers default to 77 tokens (`get_replacement_mapper(max_len=77)`,
   `get_refinement_mapper(max_len=77)`, `get_time_words_attention_alpha(max_num_words=77)`);
   the embedded tokenizer has `model_max_length` 32. The three are rebound in this process's
   copy of the module with the tokenizer's length; nothing else in the module changes.
4. `Prompt2PromptPipeline` leaves its attention processors installed after a call. Both
   pipelines share one UNet here (same weights, no copy), so the original processors are put
   back after every peer call, outside the timed region.
5. Both peers get a DDIM scheduler built from the model's own schedule (`ddim_scheduler`),
   which the model already uses; the null-text peer's DDIM arithmetic assumes it.
6. The null-text peer treats the UNet output as noise (epsilon prediction) in its inversion and
   optimisation steps, so the script refuses a v-prediction model rather than report numbers for
   a method the peer does not implement.
7. Same settings on both sides where the peer hard-codes them: guidance 7.5 (the peer's null-text
   optimisation hard-codes it), early stop 1e-5 (`early_stop_epsilon`; the peer's default is 1e-6,
   ours and the original paper's code 1e-5), and our self-attention injection limited to
   <= 16 x 16 query pixels (`self_max_pixels=256`) as the peer hard-codes.

Not changed, and part of what is measured: the peer's null-text optimisation leaves the UNet's
weights trainable, so every inner step also computes weight gradients (`--freeze-peer-weights`
turns that off to isolate the rest); its reconstruction runs the conditional and unconditional
UNet passes one after the other instead of as one batch; its P2P controller stores every
attention map of every step. Local blending is left out of the P2P comparison because the
peer's `LocalBlend` hard-codes 16 x 16 maps from specific SD 1.x layers.

    python -m benchmarks.edit_speed [--model models/base] [--world data/world] [--images 3] \
        [--steps 50] [--inner-steps 10] [--fast-lr 3e-2] [--repeats 1]
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers" / "diffusers" / "examples" / "community"
OUT = Path("benchmarks/results/edit_speed.json")
GUIDANCE = 7.5
EARLY_STOP = 1e-5
CROSS, SELF, SELF_MAX_PIXELS = 0.8, 0.4, 16 * 16


def load_module(name: str, path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"peer pipeline {path} not found (see --peers)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peer_pipelines(pipe, peers: Path):
    """(null-text peer, P2P peer) on the components of `pipe`, with the adaptations listed above."""
    from manip.editing.inversion import ddim_scheduler

    nt_mod = load_module("peer_null_text_inversion", peers / "pipeline_null_text_inversion.py")
    p2p_mod = load_module("peer_prompt2prompt", peers / "pipeline_prompt2prompt.py")

    class NullTextPeer(nt_mod.NullTextPipeline):
        @torch.no_grad()
        def image2latent(self, image_path):  # adaptation 1: the model's own latent scale
            from PIL import Image

            image = np.array(Image.open(image_path).convert("RGB"))
            image = torch.from_numpy(image).float() / 127.5 - 1
            image = image.permute(2, 0, 1).unsqueeze(0).to(self.device)
            return self.vae.encode(image)["latent_dist"].mean * self.vae.config.scaling_factor

    k = pipe.tokenizer.model_max_length  # adaptation 3
    p2p_mod.get_replacement_mapper = functools.partial(p2p_mod.get_replacement_mapper, max_len=k)
    p2p_mod.get_refinement_mapper = functools.partial(p2p_mod.get_refinement_mapper, max_len=k)
    p2p_mod.get_time_words_attention_alpha = functools.partial(p2p_mod.get_time_words_attention_alpha,
                                                               max_num_words=k)
    parts = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    nt = NullTextPeer(scheduler=ddim_scheduler(pipe), **parts)  # adaptation 5
    p2p = p2p_mod.Prompt2PromptPipeline(scheduler=ddim_scheduler(pipe), **parts)
    for p in (nt, p2p):
        p.set_progress_bar_config(disable=True)
    return nt, p2p


@contextmanager
def restored_processors(unet):
    """Adaptation 4: the P2P peer's processors come off again after each call."""
    original = dict(unet.attn_processors)
    try:
        yield
    finally:
        unet.set_attn_processor(original)


def to_uint8(images) -> np.ndarray:
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


class Runner:
    def __init__(self, pipe, nt, p2p, steps: int, inner: int, workdir: Path, freeze_peer: bool):
        self.pipe, self.nt, self.p2p = pipe, nt, p2p
        self.steps, self.inner, self.workdir, self.freeze_peer = steps, inner, workdir, freeze_peer
        self._n = 0

    def _path(self, image: np.ndarray) -> Path:
        """Adaptation 2: a fresh file per peer run, so the peer never finds a cached `.pt`."""
        from PIL import Image

        self._n += 1
        path = self.workdir / f"image-{self._n}.png"
        Image.fromarray(image).save(path)
        return path

    # ---- null-text
    def ours_null_text(self, image, source, target, lr: float = 1e-2):
        from manip.editing.inversion import ddim_scheduler, invert
        from manip.sampling import decode, denoise, encode_prompts

        t0 = time.perf_counter()
        inv = invert(self.pipe, image, source, "null-text", steps=self.steps, guidance_scale=GUIDANCE,
                     inner_steps=self.inner, lr=lr)
        t1 = time.perf_counter()
        latents = denoise(self.pipe, inv.x_T.clone(), encode_prompts(self.pipe, [source]),
                          [u[None] for u in inv.uncond], self.steps, GUIDANCE, scale_initial=False,
                          scheduler=ddim_scheduler(self.pipe))
        out = decode(self.pipe, latents)
        return t1 - t0, time.perf_counter() - t1, out

    def ours_null_text_batch(self, images, sources):
        """All images in one batch (`invert_batch`, one batched reconstruction): what the
        benchmark and dataset stages do; the peer has no batched form. Seconds are per image."""
        from manip.editing.inversion import ddim_scheduler, invert_batch
        from manip.sampling import decode, denoise, encode_prompts

        t0 = time.perf_counter()
        invs = invert_batch(self.pipe, images, sources, "null-text", steps=self.steps, guidance_scale=GUIDANCE,
                            inner_steps=self.inner)
        t1 = time.perf_counter()
        uncond = [torch.stack([inv.uncond[i] for inv in invs]) for i in range(self.steps)]
        latents = denoise(self.pipe, torch.cat([inv.x_T for inv in invs]), encode_prompts(self.pipe, sources),
                          uncond, self.steps, GUIDANCE, scale_initial=False, scheduler=ddim_scheduler(self.pipe))
        out = decode(self.pipe, latents)
        n = len(images)
        return (t1 - t0) / n, (time.perf_counter() - t1) / n, out

    def peer_null_text(self, image, source, target):
        path = self._path(image)
        frozen = [p for p in self.pipe.unet.parameters() if p.requires_grad] if self.freeze_peer else []
        for p in frozen:
            p.requires_grad_(False)
        try:
            t0 = time.perf_counter()
            x_T, uncond = self.nt.invert(str(path), source, num_inner_steps=self.inner,
                                         early_stop_epsilon=EARLY_STOP, num_inference_steps=self.steps)
            t1 = time.perf_counter()
            out = self.nt(source, uncond, x_T, num_inference_steps=self.steps, guidance_scale=GUIDANCE,
                          output_type="np").images
            t2 = time.perf_counter()
        finally:
            for p in frozen:
                p.requires_grad_(True)
            self.pipe.unet.zero_grad(set_to_none=True)  # the peer leaves weight gradients behind
            for f in (path, Path(f"{path}.pt")):
                f.unlink(missing_ok=True)
        return t1 - t0, t2 - t1, to_uint8(out)

    # ---- DDIM + P2P
    def ours_p2p(self, image, source, target):
        from manip.editing.edit import edit_inverted
        from manip.editing.inversion import invert
        from manip.editing.p2p import P2PConfig

        t0 = time.perf_counter()
        inv = invert(self.pipe, image, source, "ddim", steps=self.steps, guidance_scale=GUIDANCE)
        t1 = time.perf_counter()
        out = edit_inverted(self.pipe, inv, [target], P2PConfig(edit="replace", cross_replace=CROSS,
                                                                 self_replace=SELF, self_max_pixels=SELF_MAX_PIXELS))
        return t1 - t0, time.perf_counter() - t1, out

    def peer_p2p(self, image, source, target):
        path = self._path(image)
        try:
            t0 = time.perf_counter()
            self.nt.num_inference_steps = self.steps
            context = self.nt.get_context(source)
            latents = self.nt.ddim_inversion_loop(self.nt.image2latent(str(path)), context)
            x_T = latents[-1]
            t1 = time.perf_counter()
            with restored_processors(self.pipe.unet):
                t1b = time.perf_counter()
                out = self.p2p(prompt=[source, target], latents=x_T.expand(2, *x_T.shape[1:]).clone(),
                               num_inference_steps=self.steps, guidance_scale=GUIDANCE, output_type="np",
                               cross_attention_kwargs={"edit_type": "replace", "n_cross_replace": CROSS,
                                                       "n_self_replace": SELF}).images
                t2 = time.perf_counter()
        finally:
            path.unlink(missing_ok=True)
        return t1 - t0, t2 - t1b, to_uint8(out)


def psnr1(a: np.ndarray, b: np.ndarray) -> float:
    from manip.metrics.image_quality import psnr

    return psnr(a, b)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--world", default="data/world", help="EmojiWorld folder with a test split")
    ap.add_argument("--peers", default=str(PEERS), help="folder of the diffusers community pipelines")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--fast-lr", type=float, default=3e-2, help="null-text's initial Adam rate in the higher-rate task")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="which test scenes and edits are drawn")
    ap.add_argument("--freeze-peer-weights", action="store_true",
                    help="let the null-text peer skip weight gradients, as ours does")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline

    from manip.editing.benchmark import build_cases
    from manip.editing.images import load_image
    from manip.editing.inversion import encode_image
    from manip.runtime import set_threads
    from manip.sampling import decode
    from manip.training.checkpoint import atomic_write
    from manip.world.dataset import load_split

    set_threads()
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        print(f"error: {model} is not a diffusers pipeline folder (no model_index.json)", file=sys.stderr)
        return 2
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if pipe.scheduler.config.prediction_type != "epsilon":  # adaptation 6
        print(f"error: {model} predicts {pipe.scheduler.config.prediction_type}; the null-text peer implements "
              "epsilon prediction only", file=sys.stderr)
        return 2
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    test = load_split(Path(args.world) / "test")
    cases = build_cases(test.scenes, args.seed, args.images, kinds=("object",))
    images = [load_image(np.asarray(test.images[c.index]), size)[0] for c in cases]
    vae_recon = [decode(pipe, encode_image(pipe, im))[0] for im in images]
    nt, p2p = peer_pipelines(pipe, Path(args.peers))

    with tempfile.TemporaryDirectory(prefix="edit-speed-") as tmp:
        runner = Runner(pipe, nt, p2p, args.steps, args.inner_steps, Path(tmp), args.freeze_peer_weights)
        tasks = {"null-text": (runner.ours_null_text, runner.peer_null_text),
                 "ddim+p2p": (runner.ours_p2p, runner.peer_p2p)}
        # Warm-up: one short run of each, not recorded.
        warm = Runner(pipe, nt, p2p, 2, 1, Path(tmp), args.freeze_peer_weights)
        for fn in (warm.ours_null_text, warm.peer_null_text, warm.ours_p2p, warm.peer_p2p):
            fn(images[0], cases[0].source_caption, cases[0].target_caption)

        fast_task = f"null-text, ours at lr {args.fast_lr:g}"
        times = {t: {who: {"invert": [], "sample": []} for who in ("manip", "peer")} for t in [*tasks, fast_task]}
        outputs: dict[tuple[str, str, int], np.ndarray] = {}
        run = 0
        for r in range(args.repeats):
            for i, (case, image) in enumerate(zip(cases, images)):
                for task, (ours, peer) in tasks.items():
                    order = [(task, "manip", ours), (task, "peer", peer)]
                    if run % 2:
                        order.reverse()
                    run += 1
                    if task == "null-text":  # the higher rate runs beside the same peer run
                        order.insert(1, (fast_task, "manip", functools.partial(runner.ours_null_text, lr=args.fast_lr)))
                    for name, who, fn in order:
                        inv_s, sample_s, out = fn(image, case.source_caption, case.target_caption)
                        times[name][who]["invert"].append(inv_s)
                        times[name][who]["sample"].append(sample_s)
                        outputs[(name, who, i)] = out

    # Ours batched over every image, once, against the peer's per-image runs above.
    inv_s, sample_s, batch_out = runner.ours_null_text_batch(images, [c.source_caption for c in cases])
    batch_task = f"null-text, ours batched x{len(cases)}"
    tasks = {**tasks, fast_task: tasks["null-text"], batch_task: tasks["null-text"]}
    times[batch_task] = {"manip": {"invert": [inv_s], "sample": [sample_s]}}
    for i in range(len(cases)):
        outputs[(batch_task, "manip", i)] = batch_out[i : i + 1]
    for task in (fast_task, batch_task):
        times[task]["peer"] = times["null-text"]["peer"]
        for i in range(len(cases)):
            outputs[(task, "peer", i)] = outputs[("null-text", "peer", i)]

    results = {}
    for task in tasks:
        res = {}
        for who in ("manip", "peer"):
            inv_s = statistics.median(times[task][who]["invert"])
            sample_s = statistics.median(times[task][who]["sample"])
            recon = [outputs[(task, who, i)][0] for i in range(len(cases))]
            res[who] = {
                "invert_seconds_median": round(inv_s, 3), "sample_seconds_median": round(sample_s, 3),
                "total_seconds_median": round(inv_s + sample_s, 3),
                "recon_psnr_vs_input": round(float(np.mean([psnr1(a, b) for a, b in zip(recon, images)])), 3),
                "recon_psnr_vs_vae": round(float(np.mean([psnr1(a, b) for a, b in zip(recon, vae_recon)])), 3),
            }
        m, p = res["manip"], res["peer"]
        res["peer_over_manip_seconds"] = {
            k: round(p[f"{k}_seconds_median"] / max(m[f"{k}_seconds_median"], 1e-9), 3)
            for k in ("invert", "sample", "total")}
        res["manip_minus_peer_psnr_db"] = round(m["recon_psnr_vs_input"] - p["recon_psnr_vs_input"], 3)
        res["max_pixel_difference"] = int(max(
            np.abs(outputs[(task, "manip", i)].astype(int) - outputs[(task, "peer", i)].astype(int)).max()
            for i in range(len(cases))))
        results[task] = res

    result = {
        "model": str(model), "image_size": size, "steps": args.steps, "inner_steps": args.inner_steps,
        "fast_lr": args.fast_lr,
        "guidance_scale": GUIDANCE, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "freeze_peer_weights": args.freeze_peer_weights,
        "cases": [{"case_id": c.case_id, "source": c.source_caption, "target": c.target_caption} for c in cases],
        "tasks": results,
    }
    atomic_write(Path(args.out), json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
