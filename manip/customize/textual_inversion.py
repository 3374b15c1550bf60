"""Textual Inversion (Gal et al., 2022): the concept becomes new word embedding(s); nothing else
changes. Only the new rows of the embedding table receive gradients, and AdamW without weight
decay leaves a parameter whose gradient has always been zero exactly where it was, so every
original embedding is bit-for-bit unchanged after training.

The artifact is diffusers' textual-inversion file, `{placeholder: (n_vectors, dim)}` in
safetensors, which `StableDiffusionPipeline.load_textual_inversion` reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from manip.multilingual.language import Language

from .base import Customizer, FitConfig, save_embedding
from .concept import Concept, ConceptError

WEIGHTS = "learned_embeds.safetensors"


@dataclass(frozen=True)
class TextualInversionConfig(FitConfig):
    lr: float = 5e-3
    n_vectors: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_vectors < 1:
            raise ValueError(f"TextualInversionConfig.n_vectors must be >= 1, got {self.n_vectors}")


def placeholder_tokens(concept: Concept, n_vectors: int) -> list[str]:
    """diffusers' naming for multi-vector embeddings: `<tok>`, `<tok>_1`, ..."""
    return [concept.placeholder] + [f"{concept.placeholder}_{i}" for i in range(1, n_vectors)]


def embedding_file(concepts: list[Concept], concept: Concept) -> str:
    """diffusers' name for a single concept's file, so `load_textual_inversion(directory)` finds
    it; one file per concept name when there are several."""
    return WEIGHTS if len(concepts) == 1 else f"{concept.name}.safetensors"


def add_tokens(pipe, tokens: list[str], init: torch.Tensor | None = None) -> list[int]:
    """Add new tokens with embeddings `init` (rows, or one row broadcast); refuses a token the
    vocabulary already has, which would silently retrain a real word (a CLIP vocabulary keeps
    whole words as `word</w>`)."""
    vocab = pipe.tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocab or f"{t}</w>" in vocab]
    if taken:
        raise ConceptError(f"placeholder token(s) {taken} already exist in the tokenizer's vocabulary; "
                           "choose a new string such as '<my-concept>'")
    pipe.tokenizer.add_tokens(tokens)
    ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    if init is not None:
        with torch.no_grad():
            pipe.text_encoder.get_input_embeddings().weight[ids] = init.to(pipe.text_encoder.dtype)
    return ids


def class_embedding(pipe, noun: str) -> torch.Tensor:
    """Mean embedding of the class noun's tokens: the new vector starts at the word it refines."""
    ids = pipe.tokenizer(noun, add_special_tokens=False).input_ids
    return pipe.text_encoder.get_input_embeddings().weight[ids].detach().mean(0)


class TrainableRows(torch.nn.Module):
    """New tokens' embedding rows as a parameter of their own, substituted into the embedding
    layer's output by a forward hook. The table itself never takes a gradient, so no other row
    can move, and the optimizer updates k x dim values instead of the whole vocabulary."""

    def __init__(self, embedding: torch.nn.Embedding, ids: list[int]):
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, device=embedding.weight.device))
        self.rows = torch.nn.Parameter(embedding.weight[ids].detach().clone())
        self._table = [embedding]  # a plain reference: the table is not part of this module's state
        self._handle = embedding.register_forward_hook(self._substitute)

    def _substitute(self, module, args, out: torch.Tensor) -> torch.Tensor:
        match = args[0][..., None] == self.ids  # (batch, tokens, k)
        return torch.where(match.any(-1, keepdim=True), match.to(out.dtype) @ self.rows, out)

    @torch.no_grad()
    def commit(self) -> None:
        """Write the trained rows into the table and remove the hook."""
        self._table[0].weight[self.ids] = self.rows.to(self._table[0].weight.dtype)
        self._handle.remove()


class TextualInversion(Customizer):
    method = "textual_inversion"
    Config = TextualInversionConfig
    config: TextualInversionConfig
    uses_identifier = False

    def phrase(self, concept: Concept, language: Language = "en") -> str:
        return concept.placeholder

    def text_trains(self) -> bool:
        return True

    def _prepare(self):
        ids = []
        for c in self.concepts:
            ids += add_tokens(self.pipe, placeholder_tokens(c, self.config.n_vectors),
                              class_embedding(self.pipe, c.class_noun))
        self._rows = TrainableRows(self.pipe.text_encoder.get_input_embeddings(), ids)
        return self._rows, [self._rows.rows]

    def _finish(self) -> None:
        self._rows.commit()

    def learned_embeddings(self, concept: Concept) -> torch.Tensor:
        ids = self.pipe.tokenizer.convert_tokens_to_ids(placeholder_tokens(concept, self.config.n_vectors))
        return self.pipe.text_encoder.get_input_embeddings().weight[ids].detach().cpu().clone()

    def _save_artifact(self, directory: Path) -> None:
        for c in self.concepts:
            save_embedding(directory / embedding_file(self.concepts, c), c.placeholder, self.learned_embeddings(c))

    def _load_artifact(self, directory: Path) -> None:
        for c in self.concepts:
            self.pipe.load_textual_inversion(str(directory / embedding_file(self.concepts, c)), token=c.placeholder)
