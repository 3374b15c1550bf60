"""The bilingual text encoder: a bidirectional transformer that writes the base model's
conditioning for English and Russian prompts.

Why a new encoder in the old conditioning space, and not Kandinsky 2.0's two encoders side by
side: Kandinsky concatenates the features of a multilingual encoder and of CLIP's, which makes
the UNet's `cross_attention_dim` their sum, so the UNet must be trained again against the new
width (hours on the project's CPUs). Distilling a student into the frozen English encoder's
output keeps the UNet and VAE exactly as shipped: the student only has to say, in either
language, what the teacher says in English.

Why bidirectional: the base CLIP text model is causal (position i sees tokens <= i). Russian
word order differs from English ("красная кошка слева на пляже ночью" vs "a red cat on the left,
on the beach at night"), so the student must see the whole prompt at every position to write the
teacher's position-wise features.

Why `BertModel`: diffusers' `StableDiffusionPipeline` loads any transformers class named in
model_index.json and calls `text_encoder(ids, attention_mask=None)[0]`; passing a mask only when
`config.use_attention_mask` is true. The student is trained exactly that way (no mask: padding
is attended to, as the teacher's padding positions attend to the prompt), and its config says
`use_attention_mask: false`, so plain diffusers runs it as trained. Dropout is off: it would draw
from the global random stream, which a resumed run does not restore.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BertConfig, BertModel, CLIPTextModel, CLIPTokenizer


def student_config(tokenizer: CLIPTokenizer, hidden_size: int, layers: int, heads: int) -> BertConfig:
    """A BERT encoder as wide as the UNet's cross-attention, one position per prompt token. No
    padding index: the pad token is CLIP's end-of-text token, which ends every prompt and whose
    teacher features the UNet reads, so its embedding row must train like any other."""
    return BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden_size, max_position_embeddings=tokenizer.model_max_length, type_vocab_size=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=None,
        use_attention_mask=False,
    )


def make_student(tokenizer: CLIPTokenizer, hidden_size: int, layers: int, heads: int) -> BertModel:
    """The student, pooler included: diffusers loads `BertModel` with its default pooling layer,
    and a missing one would be re-drawn at random with a warning on every load. The pooler is
    never used, so it is frozen."""
    model = BertModel(student_config(tokenizer, hidden_size, layers, heads))
    model.pooler.requires_grad_(False)
    return model


@torch.no_grad()
def copy_teacher_embeddings(student: BertModel, tokenizer: CLIPTokenizer, teacher: CLIPTextModel,
                            teacher_tokenizer: CLIPTokenizer) -> int:
    """Start the student's rows of tokens the teacher learnt (same BPE string, non-zero row: the
    base encoder's rows of tokens that never occurred are zero) and its position embeddings from
    the teacher's. Returns how many token rows were copied."""
    rows = teacher.get_input_embeddings().weight
    teacher_vocab = teacher_tokenizer.get_vocab()
    pairs = [(sid, teacher_vocab[token]) for token, sid in tokenizer.get_vocab().items()
             if token in teacher_vocab and rows[teacher_vocab[token]].abs().sum() > 0]
    target = student.embeddings.word_embeddings.weight
    for sid, tid in pairs:
        target[sid] = rows[tid]
    n = student.config.max_position_embeddings
    student.embeddings.position_embeddings.weight.copy_(teacher.embeddings.position_embedding.weight[:n])
    return len(pairs)


def token_ids(tokenizer: CLIPTokenizer, texts: Sequence[str]) -> torch.Tensor:
    """(N, max_length) ids, padded as the pipeline pads a prompt."""
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode(model: BertModel | CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    """The conditioning the UNet cross-attends to: every position's last hidden state, computed
    without an attention mask as the pipeline computes it."""
    return model(ids.to(model.device))[0]
