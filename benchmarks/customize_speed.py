"""Customization training throughput and memory: `manip.customize.METHODS[...]` against the
official diffusers examples, run unchanged in the peers environment (`make peers`):
`textual_inversion/textual_inversion.py`, `dreambooth/train_dreambooth.py`,
`dreambooth/train_dreambooth_lora.py` and `custom_diffusion/train_custom_diffusion.py`.
Writes benchmarks/results/customize_speed.json.

Both sides train the shipped base model (`models/base`, used as it is: the examples read its
8-channel VAE, its tokenizer and its 32-token prompts without trouble, so no adapted copy is
needed) on the same concept: four single-object "teapot" renders from the concepts split,
written as PNG files that both sides read, at 64 px, with the same batch size, learning rate
and seed. What is matched so each step does the same work:

- full precision (`--mixed_precision no`), no gradient checkpointing, no EMA, no validation,
  no checkpoint inside the measured steps, data loading in the main process;
- no prior preservation on either side (DreamBooth and Custom Diffusion train on the instance
  images alone: no class images, `prior=None` for ours);
- the same trainable values, checked from what each side writes: Textual Inversion one vector
  (`--num_vectors 1`) initialised from "teapot"; DreamBooth the whole UNet, text encoder frozen;
  LoRA rank 4 with alpha = rank on the UNet's attention q/k/v/out (the example also targets
  add_k_proj/add_v_proj, which this UNet does not have); Custom Diffusion one modifier token
  "<new1>" initialised from "teapot" plus the cross-attention K/V (`--freeze_model
  crossattn_kv`), without the example's random-rescale augmentation (`--noaug`) since ours has
  none;
- the same intra-op thread count (`OMP_NUM_THREADS` for both processes, `torch.set_num_threads`
  in ours). The default is one: this machine has two cores shared with background training
  jobs, and a two-thread step stalls whenever another job holds one of the cores.

What stays different is each side's design and is part of what is measured: the examples decode
and VAE-encode the PNG files at every step (ours encodes the references once and draws a fresh
posterior sample per step); for Textual Inversion and Custom Diffusion the examples' AdamW
updates the whole token-embedding table and then restores (TI) or zeroes the gradients of (CD)
every row but the new one, where ours trains the new row as a parameter of its own; ours clips
gradients for every method (so do the DreamBooth, LoRA and Custom Diffusion examples, Textual
Inversion does not) and keeps its cosine schedule; the examples use AdamW weight decay 1e-2
(ours 0). The examples run on torch 2.14.1 (the only build with torchvision here), ours on the
project's torch; both on the CPU.

Seconds per step, three ways, from the same runs: each side trains `--short` and `--long` steps
in a fresh process.
- `median_step_seconds` (the headline and `speedup`): the median time between consecutive
  optimizer steps in the long run, after the first two. Both processes record when each step
  ends with torch's global `register_optimizer_step_post_hook` (the examples are started
  through `runpy` with that hook installed; their files and code paths are untouched). A step
  interval holds everything a step does (data, encoding, forward, backward, update) and no
  loading or one-off work, and the median ignores the stalls that other jobs on this shared
  2-core machine cause.
- `seconds_per_step_difference`: the ip2p benchmark's method, (long - short) / extra steps, on
  the in-process `fit` time for ours and the process's wall time for the examples.
- `cpu_seconds_per_step_difference`: the same difference on each process's CPU time (user +
  system, from `wait4`).
On a busy machine the differences swing by tens of percent between runs (a process that starts
while another job is busy loses seconds that no step caused), so read them as a check. The
median resists short stalls but still moves with sustained load, so ratios from one run vary
too: repeat the benchmark, or pass `--repeats` (each run then keeps its fastest repeat), to see
the spread.

Memory: each process's peak resident set (`ru_maxrss`) in the long run, and that peak above a
process of the same environment that only imports the libraries (the peers' torch is a CUDA
build, whose import alone is larger). Ratios are peer / ours: above 1 means ours is faster or
leaner. A peer script that fails is recorded with its error instead of a number.

    python -m benchmarks.customize_speed [--batch 4] [--short 3] [--long 33] [--threads 1]
        [--repeats 1] [--methods textual_inversion dreambooth lora custom_diffusion]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/results/customize_speed.json"
EXAMPLES = Path(os.environ.get("MANIP_PEERS", ROOT.parent / "shared" / "peers")) / "diffusers/examples"
SCRIPTS = {
    "textual_inversion": "textual_inversion/textual_inversion.py",
    "dreambooth": "dreambooth/train_dreambooth.py",
    "lora": "dreambooth/train_dreambooth_lora.py",
    "custom_diffusion": "custom_diffusion/train_custom_diffusion.py",
}
CLASS_NOUN = "teapot"
PLACEHOLDER = {"textual_inversion": "<teapot>", "custom_diffusion": "<new1>"}  # ours and the example's
IDENTIFIER = "sks"
LORA_RANK = 4
BIG = 10**9  # "never" for the examples' checkpoint / save intervals

OURS_IMPORTS = "import torch, diffusers, transformers, peft; from diffusers import StableDiffusionPipeline; " \
               "import manip.customize"
PEER_IMPORTS = "import torch, torchvision, accelerate, transformers, diffusers, peft; from diffusers import " \
               "AutoencoderKL, DDPMScheduler, UNet2DConditionModel, StableDiffusionPipeline; " \
               "from transformers import CLIPTextModel, CLIPTokenizer"


# Runs an example script unchanged (as `python script.py args`), with a global optimizer-step
# hook that only records when each step ends; argv: stamps file, script, its arguments.
STEP_CLOCK = """
import atexit, json, runpy, sys, time
from pathlib import Path
from torch.optim.optimizer import register_optimizer_step_post_hook
stamps, script = [], sys.argv[2]
register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
atexit.register(lambda out=sys.argv[1]: Path(out).write_text(json.dumps(stamps)))
sys.argv = sys.argv[2:]
sys.path.insert(0, str(Path(script).parent))
runpy.run_path(script, run_name="__main__")
"""
WARMUP_INTERVALS = 2  # the first step intervals hold one-off allocations


def median_step(stamps: list[float]) -> float | None:
    """Median time between consecutive optimizer steps after the warm-up ones (None when a run
    is too short to have any)."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][WARMUP_INTERVALS:]
    return statistics.median(gaps) if gaps else None


def write_concept(folder: Path, n: int, concepts: str) -> list[int]:
    """The first `n` single-object teapot renders of the concepts split, as PNG files."""
    from PIL import Image

    from manip.world.dataset import load_split

    split = load_split(concepts)
    picks = [i for i, s in enumerate(split.scenes) if len(s.objects) == 1 and s.objects[0].name == CLASS_NOUN][:n]
    if len(picks) < n:
        sys.exit(f"the concepts split has only {len(picks)} single-object {CLASS_NOUN} images")
    folder.mkdir(parents=True)
    for k, i in enumerate(picks):
        Image.fromarray(split.images[i]).save(folder / f"{k}.png")
    return picks


def ours_config(method: str, steps: int, batch: int):
    from manip.customize import METHODS

    extra = {"textual_inversion": {"n_vectors": 1}, "dreambooth": {"train_text_encoder": False},
             "lora": {"rank": LORA_RANK}, "custom_diffusion": {}}[method]
    return METHODS[method].Config(steps=steps, batch_size=batch, checkpoint_every=BIG, seed=0, **extra)


def worker(args) -> None:
    """One of our runs, in its own process so its peak memory is its own."""
    import torch
    from diffusers import StableDiffusionPipeline

    from manip.customize import METHODS, Concept, load_reference_images

    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(args.threads)
    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    paths = sorted(Path(args.image_dir).glob("*.png"))
    concept = Concept(name=CLASS_NOUN, images=load_reference_images(paths, 64),
                      templates=("a photo of {}",) * len(paths), class_noun=CLASS_NOUN,
                      placeholder=PLACEHOLDER.get(args.worker, "<teapot>"), identifier=IDENTIFIER)
    customizer = METHODS[args.worker](pipe, ours_config(args.worker, args.steps, args.batch))
    t = time.perf_counter()
    report = customizer.fit([concept], Path(args.work) / "ckpt")
    seconds = time.perf_counter() - t
    Path(args.report).write_text(json.dumps({
        "fit_seconds": seconds, "fit_peak_mb": report.peak_memory_mb,
        "trainable_parameters": report.trainable_parameters, "loss": report.history[-1]["loss"], "stamps": stamps,
        "threads": torch.get_num_threads(), "torch": torch.__version__}))


def peer_command(python: str, method: str, model: str, images: Path, batch: int, steps: int, lr: float,
                 out: Path) -> list[str]:
    common = ["--pretrained_model_name_or_path", model, "--resolution", "64", "--center_crop",
              "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--learning_rate", str(lr),
              "--seed", "0", "--output_dir", str(out), "--mixed_precision", "no", "--dataloader_num_workers", "0",
              "--checkpointing_steps", str(BIG)]
    phrase = f"{PLACEHOLDER['custom_diffusion']} {CLASS_NOUN}" if method == "custom_diffusion" \
        else f"{IDENTIFIER} {CLASS_NOUN}"
    own = {
        "textual_inversion": ["--train_data_dir", str(images), "--placeholder_token", PLACEHOLDER["textual_inversion"],
                              "--initializer_token", CLASS_NOUN, "--num_vectors", "1", "--save_steps", str(BIG)],
        "dreambooth": ["--instance_data_dir", str(images), "--instance_prompt", f"a photo of {phrase}"],
        "lora": ["--instance_data_dir", str(images), "--instance_prompt", f"a photo of {phrase}",
                 "--rank", str(LORA_RANK)],
        "custom_diffusion": ["--instance_data_dir", str(images), "--instance_prompt", f"a photo of {phrase}",
                             "--modifier_token", PLACEHOLDER["custom_diffusion"], "--initializer_token", CLASS_NOUN,
                             "--freeze_model", "crossattn_kv", "--noaug"],
    }[method]
    return [python, str(EXAMPLES / SCRIPTS[method]), *common, *own]


def run(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[int, dict[str, float]]:
    """Exit code and {wall seconds, CPU seconds, peak resident set in MB} of one process."""
    with open(log, "w") as f:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    return proc.returncode, {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024}


def keep(runs: dict, key: tuple[str, int], record: dict) -> None:
    """Fold one repeat into the kept record: the fastest time of each kind, the largest peak."""
    prev = runs.setdefault(key, record)
    for k in ("wall", "cpu", "step_wall", "median_step"):
        values = [v for v in (prev[k], record[k]) if v is not None]
        prev[k] = min(values) if values else None
    prev["rss"] = max(prev["rss"], record["rss"])


def peer_trained_values(method: str, out: Path) -> int:
    """How many values the example trained, counted in what it wrote."""
    from safetensors import safe_open

    files = {"textual_inversion": ["learned_embeds.safetensors"],
             "dreambooth": ["unet/diffusion_pytorch_model.safetensors"],
             "lora": ["pytorch_lora_weights.safetensors"],
             "custom_diffusion": ["pytorch_custom_diffusion_weights.safetensors",
                                  f"{PLACEHOLDER['custom_diffusion']}.safetensors"]}[method]
    total = 0
    for name in files:
        with safe_open(str(out / name), "pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models/base"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--short", type=int, default=3)
    ap.add_argument("--long", type=int, default=33)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--concepts", default=str(ROOT / "data/world/concepts"))
    ap.add_argument("--n-images", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    ap.add_argument("--peers-python", default=str(ROOT / ".venv-peers/bin/python"))
    ap.add_argument("--out", default=str(OUT))
    # internal: one of our runs in a child process
    ap.add_argument("--worker", choices=list(SCRIPTS), help=argparse.SUPPRESS)
    ap.add_argument("--image-dir", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.long <= args.short or args.long < WARMUP_INTERVALS + 2:
        sys.exit(f"--long must be above --short and at least {WARMUP_INTERVALS + 2}")
    if not EXAMPLES.is_dir() or not Path(args.peers_python).exists():
        sys.exit(f"needs the diffusers examples ({EXAMPLES}) and the peers environment (`make peers`)")
    model = str(Path(args.model).resolve())
    threads = str(args.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "MANIP_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        picks = write_concept(images, args.n_images, args.concepts)
        baseline = {}
        for side, python, code in (("ours", sys.executable, OURS_IMPORTS), ("peer", args.peers_python, PEER_IMPORTS)):
            rc, usage = run([python, "-c", code], env, ROOT, tmp / f"imports-{side}.log")
            if rc != 0:
                sys.exit(f"importing the {side} libraries failed:\n{tail(tmp / f'imports-{side}.log')}")
            baseline[side] = usage["rss"]
        methods = {}
        for method in args.methods:
            lr = ours_config(method, 1, args.batch).lr
            runs: dict[tuple[str, int], dict] = {}
            error = None
            for rep in range(args.repeats):
                for steps in (args.short, args.long):
                    tag = f"{method}-{steps}-{rep}"
                    # ours
                    work, report = tmp / f"ours-{tag}", tmp / f"ours-{tag}.json"
                    work.mkdir()
                    cmd = [sys.executable, "-m", "benchmarks.customize_speed", "--worker", method, "--model", model,
                           "--image-dir", str(images), "--steps", str(steps), "--batch", str(args.batch),
                           "--threads", str(args.threads), "--work", str(work), "--report", str(report)]
                    rc, usage = run(cmd, env, ROOT, tmp / f"ours-{tag}.log")
                    if rc != 0:
                        sys.exit(f"our {method} run failed:\n{tail(tmp / f'ours-{tag}.log', 4000)}")
                    got = json.loads(report.read_text())
                    keep(runs, ("ours", steps), {**got, **usage, "step_wall": got["fit_seconds"],
                                                 "median_step": median_step(got.pop("stamps"))})
                    # the example
                    if error is not None:
                        continue
                    out = tmp / f"peer-{tag}"
                    stamps = tmp / f"peer-{tag}-steps.json"
                    python, *script = peer_command(args.peers_python, method, model, images, args.batch, steps, lr,
                                                   out)
                    rc, usage = run([python, "-c", STEP_CLOCK, str(stamps), *script], env, tmp,
                                    tmp / f"peer-{tag}.log")
                    if rc != 0:
                        error = tail(tmp / f"peer-{tag}.log")
                        continue
                    keep(runs, ("peer", steps), {**usage, "step_wall": usage["wall"],
                                                 "median_step": median_step(json.loads(stamps.read_text())),
                                                 "trainable_parameters": peer_trained_values(method, out)})
            methods[method] = summarise(method, runs, args, baseline, error, lr)
            print(json.dumps({method: methods[method]}, indent=1), flush=True)
    import torch

    result = {
        "model": shown(args.model), "ours_code": code_state(),
        "concept": {"split": shown(args.concepts), "indices": picks, "class": CLASS_NOUN},
        "resolution": 64, "batch": args.batch, "steps": [args.short, args.long], "repeats": args.repeats,
        "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "prior_preservation": False, "mixed_precision": "no", "gradient_checkpointing": False,
        "torch": {"ours": torch.__version__, "peer": _peer_torch(args.peers_python)},
        "import_rss_mb": {k: round(v, 1) for k, v in baseline.items()},
        "methods": methods, "benchmark_seconds": round(time.perf_counter() - started, 1),
    }
    from manip.training.checkpoint import atomic_write

    atomic_write(Path(args.out), json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def summarise(method: str, runs: dict, args, baseline: dict, error: str | None, lr: float) -> dict:
    extra = args.long - args.short

    def by_difference(side: str, kind: str) -> float:
        return (runs[(side, args.long)][kind] - runs[(side, args.short)][kind]) / extra

    def timings(side: str) -> dict[str, float]:
        return {"median_step_seconds": runs[(side, args.long)]["median_step"],
                "seconds_per_step_difference": by_difference(side, "step_wall"),
                "cpu_seconds_per_step_difference": by_difference(side, "cpu")}

    ours_long, ours = runs[("ours", args.long)], timings("ours")
    row = {"peer_script": SCRIPTS[method], "learning_rate": lr,
           **{f"ours_{k}": round(v, 4) for k, v in ours.items()},
           "ours_max_rss_mb": round(ours_long["rss"], 1),
           "ours_above_imports_mb": round(ours_long["rss"] - baseline["ours"], 1),
           "ours_fit_peak_mb": ours_long["fit_peak_mb"],
           "ours_trainable_parameters": ours_long["trainable_parameters"]}
    if error is not None:
        return {**row, "peer_error": error}
    peer_long, peer = runs[("peer", args.long)], timings("peer")
    row.update({
        **{f"peer_{k}": round(v, 4) for k, v in peer.items()},
        "speedup": round(peer["median_step_seconds"] / ours["median_step_seconds"], 2),
        "speedup_difference": round(peer["seconds_per_step_difference"] / ours["seconds_per_step_difference"], 2),
        "speedup_cpu_difference": round(peer["cpu_seconds_per_step_difference"]
                                        / ours["cpu_seconds_per_step_difference"], 2),
        "peer_max_rss_mb": round(peer_long["rss"], 1),
        "peer_above_imports_mb": round(peer_long["rss"] - baseline["peer"], 1),
        "memory_ratio": round(peer_long["rss"] / ours_long["rss"], 2),
        "memory_ratio_above_imports": round((peer_long["rss"] - baseline["peer"])
                                            / max(ours_long["rss"] - baseline["ours"], 1.0), 2),
        "peer_trainable_parameters": peer_long["trainable_parameters"],
        "runs": {f"{side}-{steps}": {k: round(v, 3) for k in ("wall", "cpu", "step_wall", "median_step")
                                     if (v := runs[(side, steps)][k]) is not None}
                 for side in ("ours", "peer") for steps in (args.short, args.long)},
    })
    return row


def shown(path: str) -> str:
    """A path as the JSON shows it: relative to the project when inside it."""
    p = Path(path).absolute()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def code_state() -> str:
    """The commit our side ran, and whether manip/ had uncommitted changes."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True, check=True).stdout
    try:
        head, dirty = git("rev-parse", "--short", "HEAD").strip(), git("status", "--porcelain", "--", "manip")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes in manip/" if dirty.strip() else "")


def _peer_torch(python: str) -> str:
    return subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                          text=True).stdout.strip()


if __name__ == "__main__":
    main()
