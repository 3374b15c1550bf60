"""Distillation of the bilingual student from the frozen English text encoder.

Target for a scene: the teacher's last hidden state (all positions, padding included: the UNet
cross-attends to every one) on the scene's English caption in phrasing k. The student reads the
English caption and the Russian caption of the same scene in the same phrasing and must write
that target for both; so the same scene in either language conditions the UNet the same way.
The empty prompt is in every batch too: classifier-free guidance runs the UNet on it, and the
base UNet learnt the teacher's encoding of it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BertModel, CLIPTextModel, CLIPTokenizer

from manip.training.images import batch_rng
from manip.training.loop import LoopConfig, TrainResult, train

from .student import encode, token_ids


@dataclass(frozen=True)
class CaptionSet:
    """Token ids of every scene's captions, (scenes, phrasings, max_length) each: the English
    ones in the teacher's tokenizer, both languages in the student's, phrasing k beside k."""

    teacher_en: torch.Tensor
    student_en: torch.Tensor
    student_ru: torch.Tensor
    teacher_empty: torch.Tensor  # (1, max_length): the empty prompt
    student_empty: torch.Tensor

    def __len__(self) -> int:
        return len(self.teacher_en)


def _ids(tokenizer: CLIPTokenizer, captions: Sequence[Sequence[str]]) -> torch.Tensor:
    """(scenes, phrasings, max_length), pad tokens after the text as the pipeline pads a prompt.
    A caption over the tokenizer's limit is an error, not silently cut: the student would learn
    the teacher's reading of a caption it never saw whole."""
    flat = [c for scene in captions for c in scene]
    limit = tokenizer.model_max_length
    out = torch.full((len(flat), limit), tokenizer.pad_token_id, dtype=torch.long)
    for row, (text, ids) in enumerate(zip(flat, tokenizer(flat).input_ids)):
        if len(ids) > limit:
            raise ValueError(f"caption has {len(ids)} tokens, over the tokenizer limit of {limit}: {text!r}")
        out[row, : len(ids)] = torch.tensor(ids)
    return out.reshape(len(captions), -1, limit)


def caption_set(english: Sequence[Sequence[str]], russian: Sequence[Sequence[str]], tokenizer: CLIPTokenizer,
                teacher_tokenizer: CLIPTokenizer) -> CaptionSet:
    if len(english) != len(russian) or len({len(phrasings) for phrasings in [*english, *russian]}) != 1:
        raise ValueError("every scene needs as many English as Russian phrasings, in the same order")
    return CaptionSet(_ids(teacher_tokenizer, english), _ids(tokenizer, english), _ids(tokenizer, russian),
                      token_ids(teacher_tokenizer, [""]), token_ids(tokenizer, [""]))


def distill(student: BertModel, teacher: CLIPTextModel, data: CaptionSet, cfg: LoopConfig, batch_size: int,
            seed: int, checkpoint_dir: Path, desc: str = "multilingual",
            fingerprint: dict | None = None) -> TrainResult:
    """MSE of the student's features to the teacher's, over a batch of scenes in both languages
    plus the empty prompt. Scenes and phrasings are drawn from a generator seeded by
    (seed, step), so a resumed run draws the same batches."""
    teacher.requires_grad_(False).eval()
    n_phrasings = data.teacher_en.shape[1]

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = batch_rng(seed, step)
        scenes = torch.from_numpy(np.sort(rng.choice(len(data), batch_size, replace=batch_size > len(data))))
        phrasings = torch.from_numpy(rng.integers(n_phrasings, size=batch_size))
        with torch.no_grad():
            target = encode(teacher, torch.cat([data.teacher_en[scenes, phrasings], data.teacher_empty]))
        out = encode(student, torch.cat([data.student_en[scenes, phrasings], data.student_ru[scenes, phrasings],
                                         data.student_empty]))
        per_row = (out - torch.cat([target[:-1], target])).pow(2).mean((1, 2))
        return per_row.mean(), {"en": per_row[:batch_size].mean().item(),
                                "ru": per_row[batch_size:-1].mean().item()}

    return train(student, loss_fn, cfg, checkpoint_dir, desc=desc, fingerprint=fingerprint)


@torch.no_grad()
def distillation_error(student: BertModel, teacher: CLIPTextModel, data: CaptionSet,
                       batch: int = 256) -> dict[str, float]:
    """Mean squared error of the student's features to the teacher's over every caption of
    `data`, per language and for the empty prompt, beside the targets' own variance (the error
    of always answering their mean), which gives the errors a scale."""
    student.eval()
    teacher_ids = data.teacher_en.flatten(0, 1)
    pairs = {"en": data.student_en.flatten(0, 1), "ru": data.student_ru.flatten(0, 1)}
    sums = dict.fromkeys(pairs, 0.0)
    first = second = 0.0
    for i in range(0, len(teacher_ids), batch):
        target = encode(teacher, teacher_ids[i : i + batch])
        first = first + target.sum(0)
        second = second + target.pow(2).sum(0)
        for language, ids in pairs.items():
            sums[language] += float((encode(student, ids[i : i + batch]) - target).pow(2).sum())
    n = len(teacher_ids)
    size = n * target[0].numel()
    variance = float((second / n - (first / n).pow(2)).mean())
    empty = float((encode(student, data.student_empty) - encode(teacher, data.teacher_empty)).pow(2).mean())
    return {**{language: s / size for language, s in sums.items()}, "empty_prompt": empty,
            "target_variance": variance}
