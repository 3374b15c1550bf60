"""Stage `ip2p_finetune`: InstructPix2Pix fine-tuning of the base model on data/ip2p/dataset;
writes models/ip2p, a `StableDiffusionInstructPix2PixPipeline` folder, with metrics and the loss
curve. Checkpoints under checkpoints/ip2p; a rerun resumes.

Single process: `python -m stages.ip2p_finetune`. Data-parallel: `torchrun --standalone
--nproc_per_node 2 -m stages.ip2p_finetune` (a gloo group on CPUs) or `accelerate launch
--multi_gpu --num_processes 2 -m stages.ip2p_finetune` on GPUs; every process takes an equal
share of each batch, so the result matches the single-process run up to float rounding.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ._runner import StageInputError, main
from .common import code_digest, fingerprint, loop_config, publish, require, save_pretrained
from .ip2p_common import BASE, DATASET
from .params import Params, load_params

OUT = Path("models/ip2p")
CKPT = Path("checkpoints/ip2p")
METRICS = Path("metrics/ip2p_finetune.json")
PLOT = Path("plots/ip2p_finetune_loss.csv")
# The training code, as in dvc.yaml's deps: a checkpoint other code left (finished, perhaps) is
# not resumed, so a rerun after a change to it trains afresh instead of republishing old weights.
CODE = ("manip/ip2p/finetune.py", "manip/training/loop.py", "manip/training/unet.py")


def load_pairs(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(input images, edited images, instructions) of a dataset with the diffusers example's columns."""
    from manip.ip2p.dataset import load_published

    ds = load_published(require(folder / "README.md", "ip2p_dataset").parent)
    missing = {"input_image", "edit_prompt", "edited_image"} - set(ds.column_names)
    if missing:
        raise StageInputError(f"dataset {folder} lacks the columns {sorted(missing)}")
    to_array = lambda col: np.stack([np.asarray(im.convert("RGB")) for im in ds[col]])  # noqa: E731
    return to_array("input_image"), to_array("edited_image"), list(ds["edit_prompt"])


def dataset_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted((folder / "data").glob("*.parquet")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def run(params: Params) -> dict | None:
    import torch
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline

    from manip.ip2p.finetune import DropoutSettings, encode_pairs, finetune, instruct_pipeline, widen_conv_in
    from manip.models.schedulers import training_scheduler
    from manip.runtime import device

    f = params.ip2p.finetune
    # On the CPU, processes started by torchrun form a gloo group.
    accelerator = Accelerator(cpu=device().type == "cpu")
    torch.manual_seed(params.seed)
    base = StableDiffusionPipeline.from_pretrained(require(BASE / "model_index.json", "unet").parent,
                                                   safety_checker=None, requires_safety_checker=False)
    base.to(accelerator.device)
    inputs, edited, prompts = load_pairs(DATASET)
    data = encode_pairs(base.vae, base.text_encoder, base.tokenizer, inputs, edited, prompts)
    unet = widen_conv_in(base.unet)
    dropout = DropoutSettings(f.text_drop, f.image_drop, f.both_drop)
    # The data's identity, not the process count: a run may resume with more or fewer processes.
    fp = {**fingerprint(f, params.seed), "dataset": dataset_digest(DATASET), "code": code_digest(*CODE)}
    try:
        result = finetune(unet, training_scheduler(), data, loop_config(f.train), f.train.batch_size, dropout,
                          params.seed, CKPT, fp, accelerator)
    except ValueError as err:
        raise StageInputError(str(err)) from None
    if not accelerator.is_main_process:
        return None
    save_pretrained(OUT, instruct_pipeline(base.to("cpu"), result.model.to("cpu")))
    metrics = {"pairs": len(data), "instructions": len(data.prompts), "steps": f.train.steps,
               "batch_size": f.train.batch_size, "processes": accelerator.num_processes,
               "final_loss": round(result.history[-1]["loss"], 5), "train_seconds": result.seconds}
    return publish(metrics, METRICS, {PLOT: result.history})


if __name__ == "__main__":
    main(lambda: run(load_params()))
