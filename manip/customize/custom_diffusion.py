"""Custom Diffusion (Kumari et al., 2023): only the cross-attention key and value projections
train, with a new modifier token per concept ("<new1> cat") and a regularisation set of real
class images. Several concepts train jointly by passing them to one `fit`, or separately and are
then combined by the closed-form constrained merge (`merge`), which diffusers' example lacks.

The artifact uses diffusers' Custom Diffusion layout: the K/V weights in
`pytorch_custom_diffusion_weights.safetensors` under the attention-processor names
(`...attn2.processor.to_k_custom_diffusion.weight`), and one `<token>.safetensors` embedding
file per modifier token. `Customizer.load` writes those weights straight into the attention
layers; diffusers' own `UNet2DConditionModel.load_attn_procs` does not apply them when called
as the documentation shows (see the tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from manip.multilingual.language import Language

from .base import (Customizer, FitConfig, cross_attention_layers, phrase_mask, save_embedding, template_language,
                   tokenize)
from .concept import Concept
from .textual_inversion import TrainableRows, add_tokens, class_embedding

WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"
SUFFIX = {"to_k": "to_k_custom_diffusion.weight", "to_v": "to_v_custom_diffusion.weight"}


@dataclass(frozen=True)
class CustomDiffusionConfig(FitConfig):
    lr: float = 1e-4


def cross_attention_kv(unet) -> dict[str, torch.nn.Linear]:
    """The key/value projections of every cross-attention layer, under the names of diffusers'
    Custom Diffusion weight file."""
    return {f"{name}.{SUFFIX[proj]}": getattr(attn, proj)
            for name, attn in cross_attention_layers(unet).items() for proj in ("to_k", "to_v")}


class CustomDiffusion(Customizer):
    method = "custom_diffusion"
    Config = CustomDiffusionConfig
    config: CustomDiffusionConfig
    uses_identifier = False

    def phrase(self, concept: Concept, language: Language = "en") -> str:
        return f"{concept.placeholder} {concept.noun(language)}"

    def text_trains(self) -> bool:
        return True

    def _prepare(self):
        ids = [add_tokens(self.pipe, [c.placeholder], class_embedding(self.pipe, c.class_noun))[0]
               for c in self.concepts]
        self._rows = TrainableRows(self.pipe.text_encoder.get_input_embeddings(), ids)
        kv = torch.nn.ModuleList(cross_attention_kv(self.pipe.unet).values()).requires_grad_(True)
        state = torch.nn.ModuleDict({"kv": kv, "rows": self._rows})
        return state, [self._rows.rows, *kv.parameters()]

    def _finish(self) -> None:
        self._rows.commit()
        self.pipe.unet.requires_grad_(False)

    def _save_artifact(self, directory: Path) -> None:
        save_file({k: m.weight.detach().cpu().contiguous() for k, m in cross_attention_kv(self.pipe.unet).items()},
                  str(directory / WEIGHTS))
        table = self.pipe.text_encoder.get_input_embeddings().weight
        for c in self.concepts:
            row = table[self.pipe.tokenizer.convert_tokens_to_ids(c.placeholder)]
            save_embedding(directory / f"{c.placeholder}.safetensors", c.placeholder, row)

    def _load_artifact(self, directory: Path) -> None:
        load_kv_weights(self.pipe.unet, load_file(str(directory / WEIGHTS)))
        for c in self.concepts:
            self.pipe.load_textual_inversion(str(directory / f"{c.placeholder}.safetensors"), token=c.placeholder)


@torch.no_grad()
def load_kv_weights(unet, weights: dict[str, torch.Tensor]) -> None:
    layers = cross_attention_kv(unet)
    missing = sorted(set(layers) - set(weights))
    if missing:
        raise ValueError(f"Custom Diffusion weights lack {len(missing)} layers, e.g. {missing[0]}")
    for key, module in layers.items():
        module.weight.copy_(weights[key].to(module.weight))


@torch.no_grad()
def phrase_features(pipe: StableDiffusionPipeline, captions: Sequence[str], phrase: str) -> torch.Tensor:
    """Text-encoder outputs at the positions of `phrase`'s tokens in each caption: the keys a
    concept's prompts feed the cross-attention (C in the merge)."""
    ids = tokenize(pipe, captions)
    mask = phrase_mask(pipe.tokenizer, ids.cpu(), phrase).bool()
    return pipe.text_encoder(ids)[0][mask.to(ids.device)]


@torch.no_grad()
def content_features(pipe: StableDiffusionPipeline, captions: Sequence[str]) -> torch.Tensor:
    """Features of every token up to and including the end token (C_reg in the merge)."""
    ids = tokenize(pipe, captions)
    feats = pipe.text_encoder(ids)[0]
    eos = pipe.tokenizer.eos_token_id
    ends = [(seq.index(eos) if eos in seq else len(seq) - 1) for seq in ids.tolist()]
    return torch.cat([feats[i, : end + 1] for i, end in enumerate(ends)])


def closed_form_merge(w0: torch.Tensor, c: torch.Tensor, v: torch.Tensor, c_reg: torch.Tensor,
                      ridge: float = 1e-4) -> torch.Tensor:
    """argmin_W ||W C_reg^T - W0 C_reg^T||_F  s.t.  W C^T = V  (the lecture's eqs. 4-9):
    W = W0 + v^T d with d = C (C_reg^T C_reg)^-1 and v^T = (V - W0 C^T)(d C^T)^-1.

    w0: (out, in), c: (N, in) target keys, v: (out, N) their values, c_reg: (M, in). A small
    ridge on C_reg^T C_reg keeps that solve stable when the regularisation features do not span
    every direction. The keys repeat: a causal text encoder gives a phrase the same features in
    every template that starts alike, so C C^T is singular. The constraint is therefore posed on
    an orthonormal basis of what the keys span, cut at float32's resolution of the keys, with
    their values carried over; a rank-revealing least-squares solve of the singular system
    instead keeps directions that are only rounding, and the merged weights then follow the
    rounding (they changed with the thread count)."""
    w0, c, v, c_reg = (x.double() for x in (w0, c, v, c_reg))
    gram = c_reg.T @ c_reg
    gram = gram + ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    u, s, vh = torch.linalg.svd(c, full_matrices=False)
    rank = int((s > s[0] * torch.finfo(torch.float32).eps * max(c.shape)).sum())
    keys, values = vh[:rank], v @ u[:, :rank] / s[:rank]  # W keys^T = values <=> W C^T = V on that span
    d = torch.linalg.solve(gram, keys.T).T  # keys (C_reg^T C_reg)^-1, as gram is symmetric
    vt = torch.linalg.solve(d @ keys.T, (values - w0 @ keys.T).T).T  # (values - W0 keys^T)(d keys^T)^-1
    return (w0 + vt @ d).float()


@torch.no_grad()
def merge(base: StableDiffusionPipeline, artifacts: Sequence[Path], templates: Sequence[str],
          reg_captions: Sequence[str]) -> CustomDiffusion:
    """Combine separately trained Custom Diffusion concepts into `base` (modified in place): the
    merged K/V weights keep the base model's outputs on the regularisation captions and give each
    concept's phrase, in each of `templates`, the values its own fine-tuned weights gave it."""
    merged = None
    keys, values = [], []
    parts = [(Path(path), CustomDiffusion.from_manifest(base, Path(path))) for path in artifacts]
    languages = sorted({template_language(t) for t in templates})
    for _, part in parts:  # a concept with no noun in a template's language fails before `base` changes
        for c in part.concepts:
            for language in languages:
                c.noun(language)
    c_reg = content_features(base, reg_captions)  # before any new token exists: the base model's captions
    for path, part in parts:
        merged = merged or CustomDiffusion(base, part.config)
        weights = load_file(str(path / WEIGHTS))
        for c in part.concepts:
            base.load_textual_inversion(str(path / f"{c.placeholder}.safetensors"), token=c.placeholder)
            merged.concepts.append(c)
            for language in languages:  # one batch per language, the phrase written in it
                phrase = part.phrase(c, language)
                k = phrase_features(base, [t.format(phrase) for t in templates if template_language(t) == language],
                                    phrase)
                keys.append(k)
                values.append({name: w.to(k) @ k.T for name, w in weights.items()})
    if merged is None:
        raise ValueError("merge needs at least one artifact")
    c = torch.cat(keys)
    for name, module in cross_attention_kv(base.unet).items():
        v = torch.cat([part[name] for part in values], 1)
        module.weight.copy_(closed_form_merge(module.weight, c, v, c_reg))
    return merged
