"""Stage `ip2p_multilingual`: InstructPix2Pix that takes Russian instructions.

`models/ip2p`'s UNet learnt to follow the base encoder's reading of English instructions. The
bilingual student of `models/multilingual` writes that reading for captions, but an instruction
("замени кошку на собаку") is a sentence it never saw. So the student is fine-tuned further by
the same distillation, on instructions: the rules backend writes each train-split edit in both
languages (manip/ip2p/bilingual.py), and the student must give the English instruction's teacher
features for the English and the Russian instruction alike, plus the empty prompt that image-
and text-guidance run on. The UNet stays as trained.

Writes models/ip2p_multilingual, a `StableDiffusionInstructPix2PixPipeline` folder whose unet
and vae are links to models/ip2p's, and metrics/ip2p_multilingual.json with the student's error
on the instructions of held-out (test-split) scenes before and after the fine-tune. Checkpoints under
checkpoints/ip2p_multilingual.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ._runner import main
from .common import files_digest, fingerprint, loop_config, publish, require
from .ip2p_common import IP2P, IP2P_MULTILINGUAL
from .params import Params, load_params

MULTILINGUAL = Path("models/multilingual")
CKPT = Path("checkpoints/ip2p_multilingual")
METRICS = Path("metrics/ip2p_multilingual.json")
PLOT = Path("plots/ip2p_multilingual_loss.csv")


def tensors_digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def instruction_set(split: Path, seed: int, n: int, prefix: str, tokenizer, teacher_tokenizer):
    """Token ids of the English and Russian instructions of one rules edit per scene."""
    from manip.ip2p.bilingual import parallel_edits
    from manip.multilingual.distill import caption_set
    from manip.world.dataset import load_split

    english, russian = parallel_edits(load_split(require(split, "world")).scenes, seed, n, prefix)
    return caption_set([[e.edit] for e in english], [[e.edit] for e in russian], tokenizer, teacher_tokenizer)


def run(params: Params) -> dict:
    from transformers import BertModel, CLIPTextModel, CLIPTokenizer

    from manip.multilingual.distill import distill, distillation_error
    from manip.multilingual.pipeline import save_multilingual_pipeline
    from manip.runtime import device

    p = params.multilingual.ip2p
    cfg = loop_config(p.train)
    require(IP2P / "model_index.json", "ip2p_finetune")
    teacher_tokenizer = CLIPTokenizer.from_pretrained(IP2P / "tokenizer")
    teacher = CLIPTextModel.from_pretrained(IP2P / "text_encoder").to(device())
    tokenizer = CLIPTokenizer.from_pretrained(require(MULTILINGUAL / "tokenizer", "multilingual"))
    student = BertModel.from_pretrained(MULTILINGUAL / "text_encoder").to(device())
    student.pooler.requires_grad_(False)  # never used (manip/multilingual/student.py)

    train_set = instruction_set(Path("data/world/train"), params.seed, p.n_scenes, "train", tokenizer,
                                teacher_tokenizer)
    test_set = instruction_set(Path("data/world/test"), params.seed, p.n_test, "test", tokenizer, teacher_tokenizer)
    before = distillation_error(student, teacher, test_set)
    # A resumed run must start from the same student, distil the same teacher and read the same
    # instructions; the held-out set plays no part in training.
    fp = {**{k: v for k, v in fingerprint(p, params.seed).items() if k != "n_test"},
          "instructions": tensors_digest(train_set.teacher_en, train_set.student_en, train_set.student_ru),
          "student": files_digest(MULTILINGUAL / "text_encoder"), "tokenizer": files_digest(MULTILINGUAL / "tokenizer"),
          "teacher": files_digest(IP2P / "text_encoder")}
    result = distill(student, teacher, train_set, cfg, p.train.batch_size, params.seed, CKPT,
                     desc="ip2p multilingual", fingerprint=fp)
    after = distillation_error(result.model, teacher, test_set)
    save_multilingual_pipeline(IP2P_MULTILINGUAL, IP2P, tokenizer, result.model.to("cpu"))

    def relative(error: dict[str, float]) -> dict[str, float]:
        return {k: round(error[k] / error["target_variance"], 4) for k in ("en", "ru")}

    metrics = {
        "seed": params.seed,
        "train_pairs": len(train_set),
        "test_pairs": len(test_set),
        "steps": p.train.steps,
        # Instructions of held-out (test-split) scenes, the caption-trained student against the
        # fine-tuned one. Short instructions (time, style) recur word for word across splits.
        "test_mse_before": {k: round(v, 6) for k, v in before.items()},
        "test_mse_after": {k: round(v, 6) for k, v in after.items()},
        "test_mse_relative_before": relative(before),
        "test_mse_relative_after": relative(after),
        "train_seconds": result.seconds,
    }
    return publish(metrics, METRICS, {PLOT: result.history})


if __name__ == "__main__":
    main(lambda: run(load_params()))
