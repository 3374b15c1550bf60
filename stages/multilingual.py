"""Stage `multilingual`: the English + Russian variant of the embedded model.

Builds a bilingual tokenizer from the train split's English and Russian captions (every
phrasing), distils a bidirectional student text encoder from the frozen base encoder so that a
scene's caption in either language gives the features the base encoder gives its English
caption (manip/multilingual/student.py says why this and not Kandinsky 2.0's concatenated
encoders), and writes models/multilingual as a diffusers pipeline folder whose UNet and VAE are
links to the base model's. Checkpoints under checkpoints/multilingual; the held-out error of the
student on test-split captions goes to metrics/multilingual.json.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ._runner import main
from .common import files_digest, fingerprint, loop_config, publish, require
from .params import Params, load_params

BASE = Path("models/base")
OUT = Path("models/multilingual")
CKPT = Path("checkpoints/multilingual")
METRICS = Path("metrics/multilingual.json")
PLOT = Path("plots/multilingual_loss.csv")


def scene_captions(split) -> tuple[list[list[str]], list[list[str]]]:
    """Every phrasing of every scene of a `WorldSplit`, in English and in Russian."""
    from manip.multilingual import all_captions_ru

    return split.captions, [all_captions_ru(scene) for scene in split.scenes]


def run(params: Params) -> dict:
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from manip.multilingual import build_bilingual_tokenizer
    from manip.multilingual.distill import caption_set, distill, distillation_error
    from manip.multilingual.pipeline import save_multilingual_pipeline
    from manip.multilingual.student import copy_teacher_embeddings, make_student
    from manip.multilingual.tokenizer import tokenizer_files
    from manip.runtime import device
    from manip.world.dataset import load_split

    p = params.multilingual.student
    cfg = loop_config(p.train)
    require(BASE / "model_index.json", "unet")
    teacher_tokenizer = CLIPTokenizer.from_pretrained(require(BASE / "tokenizer", "text_encoder"))
    teacher = CLIPTextModel.from_pretrained(require(BASE / "text_encoder", "text_encoder")).to(device())
    english, russian = scene_captions(load_split(require(Path("data/world/train"), "world")))
    tokenizer = build_bilingual_tokenizer([c for captions in (*english, *russian) for c in captions],
                                          vocab_size=p.vocab_size, max_length=teacher_tokenizer.model_max_length)
    torch.manual_seed(params.seed)
    student = make_student(tokenizer, teacher.config.hidden_size, p.layers, p.heads)
    copied = copy_teacher_embeddings(student, tokenizer, teacher, teacher_tokenizer) if p.init_from_teacher else 0
    tokens_digest = hashlib.sha256(json.dumps(tokenizer_files(tokenizer), sort_keys=True).encode()).hexdigest()[:16]
    # A resumed run must have the same vocabulary and the same teacher, not only the same params.
    fp = {**fingerprint(p, params.seed), "tokenizer": tokens_digest, "teacher": files_digest(BASE / "text_encoder")}
    result = distill(student.to(device()), teacher, caption_set(english, russian, tokenizer, teacher_tokenizer), cfg,
                     p.train.batch_size, params.seed, CKPT, fingerprint=fp)
    test = caption_set(*scene_captions(load_split(require(Path("data/world/test"), "world"))), tokenizer,
                       teacher_tokenizer)
    error = distillation_error(result.model, teacher, test)
    save_multilingual_pipeline(OUT, BASE, tokenizer, result.model.to("cpu"))
    metrics = {
        "seed": params.seed,
        "tokenizer": {"vocab_size": len(tokenizer), "train_captions": 2 * sum(map(len, english))},
        "student": {"parameters": sum(t.numel() for t in result.model.parameters()), "teacher_rows_copied": copied},
        "steps": p.train.steps,
        # Test-split captions (compositions never seen in training), every phrasing.
        "test_mse": {k: round(v, 6) for k, v in error.items()},
        "test_mse_relative": {k: round(error[k] / error["target_variance"], 4) for k in ("en", "ru")},
        "train_seconds": result.seconds,
    }
    return publish(metrics, METRICS, {PLOT: result.history})


if __name__ == "__main__":
    main(lambda: run(load_params()))
