"""InstructPix2Pix fine-tuning throughput: `manip.ip2p.finetune` against the official diffusers
example `train_instruct_pix2pix.py` (run unchanged in the peers environment, `make peers`) on the
same dataset, base model, resolution and batch size. Writes benchmarks/results/ip2p_finetune_speed.json.

The example hard-codes Stable Diffusion's 4 latent channels (it widens conv_in to exactly 8 and
copies 4), while the shipped VAE has 8, so both sides train a model of the shipped architecture
with a 4-channel VAE (random weights: the speed does not depend on them), with the shipped text
encoder. The dataset is EmojiWorld ground truth in the published format (source render,
instruction, target render), so no pair synthesis is needed first. Each side trains `--short` and `--long`
steps from scratch; the per-step time is the difference divided by the extra steps, which leaves
out model loading and (for ours) the one-off latent and text encoding, reported separately.
Neither side uses EMA. The example runs on torch 2.14.1 (the only build with torchvision here),
ours on 2.13.0; both on the CPU with the same thread count.

    python -m benchmarks.ip2p_finetune_speed [--pairs 256] [--batch 16] [--short 5] [--long 25]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from manip.ip2p import RulesEditor, world_captions
from manip.ip2p.dataset import png_bytes, write_dataset
from manip.ip2p.finetune import DropoutSettings, encode_pairs, finetune, widen_conv_in
from manip.models.schedulers import training_scheduler
from manip.training.checkpoint import atomic_write
from manip.training.loop import LoopConfig
from manip.world import Artwork, Renderer, Scene
from manip.world.dataset import load_split
from stages.ip2p_finetune import load_pairs

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/results/ip2p_finetune_speed.json"
EXAMPLE = (Path(os.environ.get("MANIP_PEERS", ROOT.parent / "shared" / "peers"))
           / "diffusers/examples/instruct_pix2pix/train_instruct_pix2pix.py")


def ground_truth_dataset(folder: Path, n: int, artwork: str) -> None:
    renderer = Renderer(Artwork(artwork), 64)
    edits, _ = RulesEditor(0).edit_all(world_captions(load_split("data/world/train").scenes, 0, n, prefix="bench"))
    rows = []
    for e in edits:
        src, tgt = (renderer.render_array(Scene.from_dict(e.truth[k])) for k in ("source", "target"))
        rows.append({"input_image": {"bytes": png_bytes(src), "path": None}, "edit_prompt": e.edit,
                     "edited_image": {"bytes": png_bytes(tgt), "path": None}, "id": e.id, "input_caption": e.input,
                     "output_caption": e.output, "kind": e.kind, "sample": 0, "seed": 0, "p": 0.0, "cfg": 0.0,
                     "clip_text_input": 0.0, "clip_text_output": 0.0, "clip_direction": 0.0, "clip_image": 0.0,
                     "truth": json.dumps(e.truth)})
    write_dataset(folder, rows, "EmojiWorld ground-truth pairs for the fine-tuning benchmark\n")


def four_channel_model(base_dir: str, out: Path) -> str:
    from manip.models.factory import make_unet, make_vae
    from stages.params import load_params

    p = load_params()
    base = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(0)
    vae = make_vae(p.vae.block_out_channels, p.vae.layers_per_block, 4, p.vae.norm_num_groups, p.world.size)
    unet = make_unet(p.unet.block_out_channels, p.unet.layers_per_block, p.unet.attention_head_dim,
                     base.text_encoder.config.hidden_size, 4, base.unet.config.sample_size)
    StableDiffusionPipeline(vae=vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
                            scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out)
    return str(out)


def ours(model: str, dataset: Path, batch: int, steps: int, work: Path) -> tuple[float, float]:
    """(seconds of encoding, seconds of `steps` training steps)."""
    base = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    inputs, edited, prompts = load_pairs(dataset)
    t = time.perf_counter()
    data = encode_pairs(base.vae, base.text_encoder, base.tokenizer, inputs, edited, prompts)
    encode = time.perf_counter() - t
    cfg = LoopConfig(steps=steps, lr=1e-4, warmup=1, ema_decay=0.0, checkpoint_every=10**9)
    t = time.perf_counter()
    finetune(widen_conv_in(base.unet), training_scheduler(), data, cfg, batch, DropoutSettings(), 0, work)
    return encode, time.perf_counter() - t


def example(python: str, model: str, dataset: Path, batch: int, steps: int, out: Path) -> float:
    cmd = [python, str(EXAMPLE), "--pretrained_model_name_or_path", model, "--dataset_name", str(dataset),
           "--resolution", "64", "--train_batch_size", str(batch), "--max_train_steps", str(steps),
           "--learning_rate", "1e-4", "--seed", "0", "--output_dir", str(out), "--dataloader_num_workers", "0",
           "--mixed_precision", "no", "--checkpointing_steps", str(10**9)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the diffusers example failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--short", type=int, default=5)
    ap.add_argument("--long", type=int, default=25)
    ap.add_argument("--peers-python", default=str(ROOT / ".venv-peers/bin/python"))
    ap.add_argument("--artwork", default=".cache/emoji-datasource-google")
    args = ap.parse_args()
    if not EXAMPLE.is_file() or not Path(args.peers_python).exists():
        sys.exit(f"needs the diffusers example ({EXAMPLE}) and the peers environment (`make peers`)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = tmp / "dataset"
        ground_truth_dataset(dataset, args.pairs, args.artwork)
        model = four_channel_model(args.model, tmp / "model")
        runs = {}
        for steps in (args.short, args.long):
            runs[("ours", steps)] = ours(model, dataset, args.batch, steps, tmp / f"ours-{steps}")
            runs[("example", steps)] = example(args.peers_python, model, dataset, args.batch, steps,
                                               tmp / f"example-{steps}")
    extra = args.long - args.short
    ours_step = (runs[("ours", args.long)][1] - runs[("ours", args.short)][1]) / extra
    example_step = (runs[("example", args.long)] - runs[("example", args.short)]) / extra
    result = {
        "pairs": args.pairs, "batch": args.batch, "steps": [args.short, args.long], "resolution": 64,
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "ours_seconds_per_step": round(ours_step, 4), "example_seconds_per_step": round(example_step, 4),
        "ours_samples_per_second": round(args.batch / ours_step, 2),
        "example_samples_per_second": round(args.batch / example_step, 2),
        "speedup": round(example_step / ours_step, 2),
        "ours_one_off_encoding_seconds": round(runs[("ours", args.long)][0], 2),
        "wall_seconds": {f"{k[0]}-{k[1]}": round(v[1] if k[0] == "ours" else v, 2) for k, v in runs.items()},
    }
    atomic_write(OUT, json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
