"""ELITE (Wei et al., 2023): an encoder, trained once, that turns ONE image of a new concept into
a word embedding plus local features, so customizing a concept costs a forward pass instead
of a per-concept optimisation.

- Feature extractor: the pipeline's own frozen VAE encoder, read at several depths (the output
  of every down block and of the mid block, captured by forward hooks during the same
  `vae.encode` that yields the training latents). The paper reads CLIP's image encoder; the
  project's CLIP (`models/clip`) and attribute judge (`models/judge`) are the evaluators that
  score every method, and an encoder built on them would be graded by its own features.
- Global mapping: one small CNN per feature level, deepest first, maps that level to a word
  embedding. All words stand in the caption while training; the first (deepest, most
  semantic) is the primary word, the only one a fitted concept keeps, as in the paper: the
  auxiliary words soak up background and layout so the primary one stays editable. The
  paper's L1 penalty on the words keeps them from growing far past ordinary embeddings.
- Local mapping: every level is pooled to a `local_grid` x `local_grid` patch grid and
  projected to cross-attention context features; per cross-attention layer, trainable key /
  value projections (initialised from the layer's own `to_k` / `to_v`) turn them into extra
  keys and values. A diffusers attention processor, installed by module path, adds their
  attention output to the layer's, weighted at each pixel by the concept word's attention
  map (normalised to a maximum of 1): detail goes where the concept is drawn and nowhere else.
- Training (`train_encoder`) follows the paper's two stages with the shared, resumable loop:
  the global mapping first, then the local mapping with the global one frozen, so the word
  has to carry the concept on its own before local detail can help. The UNet, VAE and text
  encoder never change: ELITE's released global stage also trains copies of the
  cross-attention K/V, which would alter every prompt, while here a sampling call whose
  prompts do not name a concept runs exactly as the base model. No object masks: a user's
  reference image comes without one.

The artifact of a fitted concept is its primary word in diffusers' textual-inversion format
(read by `load_textual_inversion`) and its per-layer local keys / values in safetensors; the
encoder itself is a diffusers `ModelMixin` (`save_pretrained` / `from_pretrained`).
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

import numpy as np
import torch
from diffusers import ConfigMixin, DDPMScheduler, ModelMixin, StableDiffusionPipeline
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file, save_file
from torch import nn

from manip.multilingual.language import Language
from manip.runtime import PeakMemory
from manip.training.images import batch_rng
from manip.training.loop import LoopConfig, LossFn, TrainResult, train
from manip.training.unet import diffusion_loss
from manip.world.captions import object_phrase
from manip.world.dataset import WorldSplit
from manip.world.vocab import BASE_OBJECTS

from .base import (Customizer, FitConfig, FitReport, LatentSet, PriorSet, cross_attention_layers, encode_images,
                   save_embedding, tokenize)
from .concept import Concept, ConceptError
from .textual_inversion import add_tokens, class_embedding, embedding_file

LOCAL_SUFFIX = ".local.safetensors"


@dataclass(frozen=True)
class EncoderConfig:
    """Settings of `train_encoder`: the mapping networks' shape and both training stages."""

    global_steps: int = 4000
    local_steps: int = 2000
    lr: float = 1e-4
    batch_size: int = 8
    warmup: int = 100
    checkpoint_every: int = 500
    n_words: int = 3  # words per image, one per feature level from the deepest; the first is the primary word
    width: int = 128  # channels of the mapping networks
    local_grid: int = 8  # the local mapping gives local_grid**2 patch tokens
    word_reg: float = 0.01  # weight of the L1 penalty on the words (the paper's regulariser)
    # The primary word starts at this word's embedding for every image (a vocabulary-pruned text
    # encoder such as the shipped base one holds zeros for words it never saw: an empty start).
    init_word: str = "object"
    slot: str = "S*"  # the placeholder the training captions name the object with
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("global_steps", "local_steps", "batch_size", "checkpoint_every", "n_words", "width", "local_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"EncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "word_reg"):
            if getattr(self, name) < 0:
                raise ValueError(f"EncoderConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"EncoderConfig.lr must be > 0, got {self.lr}")
        if not self.init_word.strip():
            raise ValueError("EncoderConfig.init_word must be a word the tokenizer knows, got an empty string")
        if not self.slot or self.slot != self.slot.strip() or len(self.slot.split()) != 1:
            raise ValueError(f"EncoderConfig.slot must be one token-like string without spaces, got {self.slot!r}")


@dataclass(frozen=True)
class EliteConfig(FitConfig):
    """`encoder` is the directory a trained `EliteEncoder` was saved to; `local_weight` is the
    paper's lambda, the strength of the local features at generation (0: the word alone).
    The training fields inherited from `FitConfig` are unused: `fit` trains nothing."""

    encoder: str = ""
    local_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.local_weight < 0:
            raise ValueError(f"EliteConfig.local_weight must be >= 0, got {self.local_weight}")


def resolution(pipe: StableDiffusionPipeline) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def check_images(pipe: StableDiffusionPipeline, images: Any, what: str) -> None:
    """The encoder reads images at the resolution it was trained on: the pipeline's own."""
    size = resolution(pipe)
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (size, size, 3)):
        raise ConceptError(f"{what}: ELITE encodes uint8 images of shape (N, {size}, {size}, 3) (the pipeline's "
                           f"resolution), got {getattr(images, 'dtype', type(images).__name__)} "
                           f"{getattr(images, 'shape', '')}")
    if len(images) == 0:
        raise ConceptError(f"{what}: no image given")


def feature_blocks(vae) -> list[nn.Module]:
    """The VAE encoder's stages whose outputs are the feature levels, shallow to deep."""
    return [*vae.encoder.down_blocks, vae.encoder.mid_block]


def pipeline_dims(pipe: StableDiffusionPipeline) -> dict[str, Any]:
    """Everything about a pipeline an encoder depends on (its config must match): the shapes,
    and the text encoder's kind, since a word means something only in the embedding space it
    was learnt for (the multilingual student's rows are as wide as CLIP's but not the same space)."""
    channels = list(pipe.vae.config.block_out_channels)
    layers = cross_attention_layers(pipe.unet)
    return {"feature_channels": [*channels, channels[-1]],
            "text_encoder": type(pipe.text_encoder).__name__,
            "word_dim": pipe.text_encoder.get_input_embeddings().embedding_dim,
            "context_dim": pipe.unet.config.cross_attention_dim,
            "attention_layers": list(layers),
            "attention_dims": [m.to_k.out_features for m in layers.values()]}


def encode_with_features(pipe: StableDiffusionPipeline, images: np.ndarray,
                         captions: Sequence[str] = ()) -> tuple[list[torch.Tensor], LatentSet]:
    """One pass of the frozen VAE encoder gives both the posterior (for the diffusion loss)
    and the multi-level features the mapping networks read, shallow to deep."""
    blocks = feature_blocks(pipe.vae)
    outputs: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda _module, _args, out: outputs.append(out)) for block in blocks]
    try:
        latents = encode_images(pipe, images, list(captions))
    finally:
        for handle in handles:
            handle.remove()
    # A sliced VAE (`enable_slicing`) runs its encoder once per image: join the passes per level.
    return [torch.cat(outputs[level :: len(blocks)]) for level in range(len(blocks))], latents


def _global_map(channels: int, width: int, word_dim: int) -> nn.Sequential:
    """Feature map -> one word. The output layer starts at zero, so every image starts at the
    same word (its bias, set by `train_encoder`) and the network learns what differs."""
    out = nn.Linear(width, word_dim)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(nn.GroupNorm(1, channels), nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, width), nn.SiLU(), out)


class EliteEncoder(ModelMixin, ConfigMixin):
    """The global and local mapping networks (the trainable part of ELITE; the VAE encoder
    that feeds them stays in the pipeline). Saved and loaded as any diffusers model."""

    @register_to_config
    def __init__(self, feature_channels: list[int], word_dim: int, context_dim: int, attention_layers: list[str],
                 attention_dims: list[int], n_words: int = 3, width: int = 128, local_grid: int = 8,
                 text_encoder: str = "CLIPTextModel"):
        super().__init__()
        if not 1 <= n_words <= len(feature_channels):
            raise ValueError(f"n_words must be between 1 and the {len(feature_channels)} feature levels of this "
                             f"VAE, got {n_words}")
        if len(attention_layers) != len(attention_dims) or not attention_layers:
            raise ValueError(f"need one dimension per cross-attention layer, got {len(attention_dims)} for "
                             f"{len(attention_layers)} layers")
        self.global_maps = nn.ModuleList(_global_map(c, width, word_dim) for c in feature_channels[::-1][:n_words])
        self.local_in = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(1, c), nn.Conv2d(c, width, 1), nn.AdaptiveAvgPool2d(local_grid))
            for c in feature_channels)
        # The final LayerNorm matches the text encoder's, so the copied to_k / to_v see inputs
        # on the scale of the context features they were trained on.
        self.local_out = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, context_dim),
                                       nn.LayerNorm(context_dim))
        self.to_k_local = nn.ModuleList(nn.Linear(context_dim, d, bias=False) for d in attention_dims)
        self.to_v_local = nn.ModuleList(nn.Linear(context_dim, d, bias=False) for d in attention_dims)

    @classmethod
    def for_pipeline(cls, pipe: StableDiffusionPipeline, n_words: int = 3, width: int = 128,
                     local_grid: int = 8) -> "EliteEncoder":
        return cls(**pipeline_dims(pipe), n_words=n_words, width=width, local_grid=local_grid)

    def check_pipeline(self, pipe: StableDiffusionPipeline) -> None:
        wrong = [f"{key}: encoder {self.config[key]}, pipeline {value}"
                 for key, value in pipeline_dims(pipe).items() if _plain(self.config[key]) != value]
        if wrong:
            raise ValueError("this ELITE encoder was trained for another pipeline: " + "; ".join(wrong))

    def _levels(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Features as the mapping networks take them: the VAE's blocks can return channels-last
        tensors, on which GroupNorm's CPU backward crashes (torch 2.13), hence `contiguous`."""
        if len(features) != len(self.config.feature_channels):
            raise ValueError(f"expected {len(self.config.feature_channels)} feature levels, got {len(features)}")
        return [f.to(self.dtype).contiguous() for f in features]

    def words(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, n_words, word_dim), the primary word first."""
        deepest_first = self._levels(features)[::-1]
        return torch.stack([m(f) for m, f in zip(self.global_maps, deepest_first)], 1)

    def local_tokens(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, local_grid**2, context_dim): every level pooled to the patch grid, projected, averaged."""
        grid = torch.stack([m(f) for m, f in zip(self.local_in, self._levels(features))]).mean(0)
        return self.local_out(grid.flatten(2).transpose(1, 2))

    def local_kv(self, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per cross-attention layer (processor name), the local keys and values."""
        names = self.config.attention_layers
        return ({n: k(tokens) for n, k in zip(names, self.to_k_local)},
                {n: v(tokens) for n, v in zip(names, self.to_v_local)})


def _plain(value: Any) -> Any:
    """Config values come back from JSON as lists where they went in as tuples."""
    return list(value) if isinstance(value, (list, tuple)) else value


def word_positions(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Index of the first `token_id` in each row of `ids`; -1 in rows without it."""
    hit = ids == token_id
    return torch.where(hit.any(1), hit.int().argmax(1), -1)


@dataclass(frozen=True)
class Injection:
    """One concept's local features for the prompts of one sampling (or training) call."""

    positions: torch.Tensor  # (B,) token index of the concept word in each prompt, -1 where absent
    keys: dict[str, torch.Tensor]  # processor name -> (1 or B, patches, inner_dim)
    values: dict[str, torch.Tensor]

    def rows(self, n: int) -> torch.Tensor:
        """Positions for a UNet batch of `n` rows. With classifier-free guidance the batch is
        [unconditional, conditional] (as diffusers and `manip.sampling` build it); the
        unconditional half gets no local features, as in the paper."""
        b = len(self.positions)
        if n == b:
            return self.positions
        if n == 2 * b:
            return torch.cat([torch.full_like(self.positions, -1), self.positions])
        raise RuntimeError(f"local features were set up for {b} prompts but the UNet ran on {n} rows")


class LocalState:
    """What the local-attention processors of one pipeline read: the weight lambda and the
    injections of the call in progress (none outside one: the layers then run as before)."""

    def __init__(self, weight: float):
        self.weight = weight
        self.injections: list[Injection] = []

    @contextmanager
    def active(self, injections: Sequence[Injection]) -> Iterator[None]:
        self.injections = list(injections)
        try:
            yield
        finally:
            self.injections = []


class LocalAttnProcessor:
    """A cross-attention layer plus ELITE's local term: for each concept in the prompt,
    softmax(Q K_local^T) V_local, weighted at each pixel by the concept word's attention
    (per head, divided by its maximum over pixels) and by lambda. Calls without a concept, or
    with lambda = 0, go to the layer's previous processor unchanged."""

    def __init__(self, name: str, state: LocalState, original: Any):
        self.name = name
        self.state = state
        self.original = original

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 **kwargs) -> torch.Tensor:
        if not self.state.injections or not self.state.weight or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        n, length = context.shape[:2]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key, value = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attn.prepare_attention_mask(attention_mask, length, n))
        out = torch.bmm(probs, value)
        per_head = probs.view(n, attn.heads, probs.shape[1], length)
        for injection in self.state.injections:
            rows = injection.rows(n)
            k_local = attn.head_to_batch_dim(injection.keys[self.name].expand(n, -1, -1))
            v_local = attn.head_to_batch_dim(injection.values[self.name].expand(n, -1, -1))
            local = torch.bmm(attn.get_attention_scores(query, k_local), v_local)
            word = per_head[torch.arange(n, device=rows.device), :, :, rows.clamp(min=0)]  # (n, heads, pixels)
            weight = word / word.amax(-1, keepdim=True).clamp_min(1e-12) * (rows >= 0)[:, None, None]
            out = out + self.state.weight * weight.reshape(n * attn.heads, -1, 1) * local
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(out)))


def install_local_attention(unet, state: LocalState) -> dict[str, Any]:
    """Put a `LocalAttnProcessor` on every cross-attention layer, by module path; returns the
    processors it replaced (to restore them with `unet.set_attn_processor`)."""
    original = dict(unet.attn_processors)
    layers = cross_attention_layers(unet)
    for name, m in layers.items():
        extras = (m.residual_connection, m.group_norm is not None, m.spatial_norm is not None,
                  m.rescale_output_factor != 1)
        if any(extras):
            raise ValueError(f"{name}: ELITE's local attention supports plain cross-attention layers (no group or "
                             "spatial norm, residual connection or output rescaling)")
    unet.set_attn_processor({name: LocalAttnProcessor(name, state, proc) if name in layers else proc
                             for name, proc in original.items()})
    return original


@contextmanager
def injected_words(text_encoder, token_ids: Sequence[int], words: torch.Tensor) -> Iterator[None]:
    """Run the text encoder with per-image words: a forward hook on the token-embedding table
    puts `words[b, k]` wherever prompt b holds `token_ids[k]`. Gradients reach the mapping
    network and the table itself is never written."""

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        for k, token in enumerate(token_ids):
            output = torch.where((args[0] == token)[..., None], words[:, k, None].to(output.dtype), output)
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def single_object_set(split: WorldSplit, slot: str = "S*") -> tuple[np.ndarray, list[list[str]]]:
    """ELITE's training set from an EmojiWorld split: the single-object scenes of base objects
    (the reserved concepts stay unseen: customization is evaluated on them), each phrasing
    with the object's words (article, colour, name) replaced by `slot`."""
    keep, captions = [], []
    for i, (scene, phrasings) in enumerate(zip(split.scenes, split.captions)):
        if len(scene.objects) != 1 or scene.objects[0].name not in BASE_OBJECTS:
            continue
        words = object_phrase(scene.objects[0], with_slot=False)
        if any(c.count(words) != 1 for c in phrasings):
            raise ValueError(f"scene {i}: the object phrase {words!r} does not occur once in each of {phrasings}")
        keep.append(i)
        captions.append([c.replace(words, slot) for c in phrasings])
    if not keep:
        raise ValueError("the split has no single-object scene of a base object to train ELITE on")
    return np.asarray(split.images[keep]), captions


def _slot_tokens(pipe: StableDiffusionPipeline, cfg: EncoderConfig) -> tuple[list[str], list[int]]:
    """The slot and its auxiliary-word tokens, added to the tokenizer unless an earlier call
    on this pipeline already did (their table rows are never read: the hook replaces them)."""
    tokens = [cfg.slot] + [f"{cfg.slot}_aux{k}" for k in range(1, cfg.n_words)]
    added = pipe.tokenizer.get_added_vocab()
    if all(t in added for t in tokens):
        return tokens, [added[t] for t in tokens]
    return tokens, add_tokens(pipe, tokens)


def _data_digest(images: np.ndarray, captions: Sequence[Sequence[str]]) -> str:
    """Identifies the training data in checkpoint fingerprints: resuming on other data starts over."""
    digest = hashlib.sha256(np.ascontiguousarray(images).data)
    digest.update(json.dumps([list(c) for c in captions]).encode())
    return digest.hexdigest()


def train_encoder(pipe: StableDiffusionPipeline, images: np.ndarray, captions_with_slot: Sequence[Sequence[str]],
                  config: EncoderConfig, checkpoint_dir: Path) -> tuple[EliteEncoder, FitReport]:
    """Train ELITE's mapping networks on `images` (N, H, W, 3 uint8 at the pipeline's
    resolution), each with one or more captions naming the object by `config.slot` exactly
    once (`single_object_set` builds them from EmojiWorld).

    The global stage runs `config.global_steps` steps in `checkpoint_dir/global`, the local
    stage `config.local_steps` in `checkpoint_dir/local`; a run stopped anywhere resumes
    exactly, and the report numbers the local steps after the global ones. The pipeline's
    models stay frozen; its tokenizer gains the slot tokens."""
    cfg = config
    check_images(pipe, images, "train_encoder")
    if len(captions_with_slot) != len(images):
        raise ValueError(f"train_encoder needs captions for each image: {len(captions_with_slot)} caption lists "
                         f"for {len(images)} images")
    for phrasings in captions_with_slot:
        if isinstance(phrasings, str) or not phrasings:
            raise ValueError(f"each image needs a list of one or more captions, got {phrasings!r}")
        for caption in phrasings:
            if caption.count(cfg.slot) != 1:
                raise ValueError(f"caption {caption!r} must name the object by the slot {cfg.slot!r} exactly once")
    tokens, token_ids = _slot_tokens(pipe, cfg)
    expanded = [[c.replace(cfg.slot, " ".join(tokens)) for c in phrasings] for phrasings in captions_with_slot]
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = EliteEncoder.for_pipeline(pipe, cfg.n_words, cfg.width, cfg.local_grid)
    with torch.no_grad():
        encoder.global_maps[0][-1].bias.copy_(class_embedding(pipe, cfg.init_word))
        for layer, k, v in zip(cross_attention_layers(pipe.unet).values(), encoder.to_k_local, encoder.to_v_local):
            k.weight.copy_(layer.to_k.weight)
            v.weight.copy_(layer.to_v.weight)
    encoder.to(pipe.unet.device).requires_grad_(False)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    state = LocalState(weight=1.0)

    def batch(step: int, stage: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Generator]:
        rng = batch_rng(cfg.seed, step, stream=stage)
        idx = np.sort(rng.integers(0, len(images), cfg.batch_size))
        texts = [expanded[i][int(rng.integers(len(expanded[i])))] for i in idx]
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        features, posterior = encode_with_features(pipe, images[idx])
        noise = torch.randn(posterior.mean.shape, generator=gen).to(posterior.mean.device)
        ids = tokenize(pipe, texts)
        for text, row in zip(texts, ids):
            if not all((row == t).any() for t in token_ids):
                raise ValueError(f"caption {text!r} loses the slot to truncation at {len(row)} tokens")
        return features, posterior.mean + posterior.std * noise, ids, gen

    def global_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        features, latents, ids, gen = batch(step, 0)
        words = encoder.words(features)
        with injected_words(pipe.text_encoder, token_ids, words):
            context = pipe.text_encoder(ids)[0]
        loss = diffusion_loss(pipe.unet, scheduler, latents, context, gen)
        reg = words.abs().mean()
        return loss + cfg.word_reg * reg, {"diffusion": loss.item(), "word_l1": reg.item()}

    def local_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        features, latents, ids, gen = batch(step, 1)
        with torch.no_grad(), injected_words(pipe.text_encoder, token_ids, encoder.words(features)):
            context = pipe.text_encoder(ids)[0]
        keys, values = encoder.local_kv(encoder.local_tokens(features))
        with state.active([Injection(word_positions(ids, token_ids[0]).to(latents.device), keys, values)]):
            return diffusion_loss(pipe.unet, scheduler, latents, context, gen), {}

    settings = asdict(cfg)
    data = _data_digest(images, captions_with_slot)

    def run(stage: str, module: nn.Module, loss_fn: LossFn, steps: int, exclude: tuple[str, ...]) -> TrainResult:
        loop = LoopConfig(steps=steps, lr=cfg.lr, warmup=min(cfg.warmup, steps - 1),
                          checkpoint_every=cfg.checkpoint_every, log_every=min(25, steps))
        fingerprint = {"method": "elite-encoder", "stage": stage, "data": data,
                       "config": {k: v for k, v in settings.items() if k not in exclude}}
        module.requires_grad_(True)
        try:
            return train(module, loss_fn, loop, Path(checkpoint_dir) / stage, desc=f"elite {stage}",
                         fingerprint=fingerprint)
        finally:
            module.requires_grad_(False)

    local_modules = nn.ModuleList([encoder.local_in, encoder.local_out, encoder.to_k_local, encoder.to_v_local])
    with PeakMemory() as peak:
        # Raising global_steps extends the global stage and so invalidates the local one.
        first = run("global", encoder.global_maps, global_loss, cfg.global_steps, ("global_steps", "local_steps"))
        original = install_local_attention(pipe.unet, state)
        try:
            second = run("local", local_modules, local_loss, cfg.local_steps, ("local_steps",))
        finally:
            pipe.unet.set_attn_processor(original)
    encoder.eval()
    history = first.history + [{**row, "step": row["step"] + cfg.global_steps} for row in second.history]
    resumed = first.resumed_from if first.resumed_from < cfg.global_steps else cfg.global_steps + second.resumed_from
    return encoder, FitReport(history=history, seconds=round(first.seconds + second.seconds, 1), resumed_from=resumed,
                              peak_memory_mb=peak.megabytes,
                              trainable_parameters=sum(p.numel() for p in encoder.parameters()))


@dataclass(frozen=True)
class _ConceptLocal:
    """A fitted concept's local keys and values, injected where a prompt holds its token."""

    token: str
    keys: dict[str, torch.Tensor]  # processor name -> (1, patches, inner_dim)
    values: dict[str, torch.Tensor]


class Elite(Customizer):
    """Customize concepts with a trained ELITE encoder (`EliteConfig.encoder`): one reference
    image per concept, no training. Prompts name a concept by its placeholder alone."""

    method = "elite"
    Config = EliteConfig
    config: EliteConfig
    uses_identifier = False

    def __init__(self, pipe: StableDiffusionPipeline, config: EliteConfig | None = None):
        super().__init__(pipe, config)
        self._state = LocalState(self.config.local_weight)
        self._locals: list[_ConceptLocal] = []

    def phrase(self, concept: Concept, language: Language = "en") -> str:
        return concept.placeholder

    def _prepare(self) -> NoReturn:
        raise TypeError("ELITE has no per-concept parameters to train: fit runs the trained encoder")

    def _encoder(self) -> EliteEncoder:
        path = Path(self.config.encoder)
        if not self.config.encoder or not (path / "config.json").is_file():
            raise ValueError("EliteConfig.encoder must be the directory a trained EliteEncoder was saved to "
                             f"(train_encoder's result, written by save_pretrained), got {self.config.encoder!r}")
        encoder = EliteEncoder.from_pretrained(path).to(self.pipe.unet.device).eval()
        encoder.check_pipeline(self.pipe)
        return encoder

    def fit(self, concepts: Sequence[Concept], checkpoint_dir: Path, prior: PriorSet | None = None) -> FitReport:
        """Encode each concept's single reference image: its primary word joins the vocabulary
        under the concept's placeholder and its local features go to the cross-attention
        layers. Nothing trains, so nothing is written to `checkpoint_dir` (kept for the shared
        interface)."""
        if prior is not None:
            raise ValueError("ELITE trains nothing per concept, so a prior set has no use: pass prior=None")
        if self._locals:
            raise RuntimeError("this Elite customizer already holds concepts: fit them all in one call")
        self._check_concepts(concepts)
        for c in concepts:
            if len(c.images) != 1:
                raise ConceptError(f"concept {c.name!r}: ELITE encodes exactly one reference image, "
                                   f"got {len(c.images)}")
            check_images(self.pipe, c.images, f"concept {c.name!r}")
        encoder = self._encoder()
        start = time.perf_counter()
        dtype = self.pipe.unet.dtype
        with PeakMemory() as peak, torch.no_grad():
            for c in concepts:
                features, _ = encode_with_features(self.pipe, c.images)
                add_tokens(self.pipe, [c.placeholder], encoder.words(features)[0, 0])
                keys, values = encoder.local_kv(encoder.local_tokens(features))
                self._locals.append(_ConceptLocal(c.placeholder, {n: t.to(dtype) for n, t in keys.items()},
                                                  {n: t.to(dtype) for n, t in values.items()}))
        self.concepts = list(concepts)
        install_local_attention(self.pipe.unet, self._state)
        return FitReport(history=[], seconds=round(time.perf_counter() - start, 3), resumed_from=0,
                         peak_memory_mb=peak.megabytes, trainable_parameters=0)

    def generate(self, prompts: Sequence[str], generators: list[torch.Generator], steps: int = 50,
                 guidance_scale: float = 7.5) -> np.ndarray:
        """Sample with each concept's local features active in the prompts that name it; a call
        whose prompts name no concept runs the base model's own attention."""
        prompts = self.read(prompts)
        ids = tokenize(self.pipe, prompts)
        injections = []
        for c in self._locals:
            positions = word_positions(ids, self.pipe.tokenizer.convert_tokens_to_ids(c.token))
            if (positions >= 0).any():
                injections.append(Injection(positions.to(self.pipe.unet.device), c.keys, c.values))
        with self._state.active(injections):
            return super().generate(prompts, generators, steps=steps, guidance_scale=guidance_scale)

    def _save_artifact(self, directory: Path) -> None:
        table = self.pipe.text_encoder.get_input_embeddings().weight
        for c, local in zip(self.concepts, self._locals):
            row = table[self.pipe.tokenizer.convert_tokens_to_ids(c.placeholder)]
            save_embedding(directory / embedding_file(self.concepts, c), c.placeholder, row)
            tensors = {**{f"{n}.key": t.cpu().contiguous() for n, t in local.keys.items()},
                       **{f"{n}.value": t.cpu().contiguous() for n, t in local.values.items()}}
            save_file(tensors, str(directory / f"{c.name}{LOCAL_SUFFIX}"))

    def _load_artifact(self, directory: Path) -> None:
        layers = cross_attention_layers(self.pipe.unet)
        device, dtype = self.pipe.unet.device, self.pipe.unet.dtype
        for c in self.concepts:
            self.pipe.load_textual_inversion(str(directory / embedding_file(self.concepts, c)), token=c.placeholder)
            stored = load_file(str(directory / f"{c.name}{LOCAL_SUFFIX}"))
            missing = [n for n in layers if f"{n}.key" not in stored or f"{n}.value" not in stored]
            if missing:
                raise ValueError(f"{directory}: the local features lack {len(missing)} cross-attention layers of this "
                                 f"UNet, e.g. {missing[0]}: the artifact was made for another model")
            self._locals.append(_ConceptLocal(c.placeholder, {n: stored[f"{n}.key"].to(device, dtype) for n in layers},
                                              {n: stored[f"{n}.value"].to(device, dtype) for n in layers}))
        install_local_attention(self.pipe.unet, self._state)
