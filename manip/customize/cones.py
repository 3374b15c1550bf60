"""Cones (Liu et al., 2023): a concept lives in a small set of "concept neurons", output
channels of the cross-attention key and value projections. They are found by gradient-based
importance: zeroing channel r of weight W changes the concept loss by about -<W_r, dL/dW_r>
(first order), so the channels with the largest positive score are the ones whose closing
helps the model draw the concept. The search runs for `search_rounds`, each closing the
`neurons_per_round` best still-open channels and recomputing gradients; the closed channels'
scalings (starting at 0) are then trained for `steps` steps, everything else frozen.

The concept is stored as that sparse set: per layer, channel indices and scalings. Several
concepts combine by the union of their neurons (a channel two concepts share takes the
product of their scalings).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from .base import Customizer, FitConfig
from .concept import ConceptError
from .custom_diffusion import cross_attention_kv

WEIGHTS = "concept_neurons.safetensors"


@dataclass(frozen=True)
class ConesConfig(FitConfig):
    lr: float = 1e-2
    steps: int = 100
    search_rounds: int = 10
    neurons_per_round: int = 20
    search_batches: int = 2  # batches whose gradients are summed in each search round

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("search_rounds", "neurons_per_round", "search_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"ConesConfig.{name} must be >= 1, got {getattr(self, name)}")


class ChannelScale(torch.nn.Module):
    """A parametrization scaling selected output channels (rows) of a weight."""

    def __init__(self, index: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index)
        self.scale = torch.nn.Parameter(scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return scale_rows(weight, self.index, self.scale)


def scale_rows(weight: torch.Tensor, index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    factors = torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device)
    factors = factors.index_put((index,), scale.to(weight.dtype))
    return weight * factors[:, None]


def _key(name: str) -> str:
    return name.replace(".", "/")


class Cones(Customizer):
    method = "cones"
    Config = ConesConfig
    config: ConesConfig

    def search(self) -> dict[str, torch.Tensor]:
        """Channel indices per layer, closed round by round by first-order importance."""
        layers = cross_attention_kv(self.pipe.unet)
        closed = {name: torch.zeros(m.weight.shape[0], dtype=torch.bool, device=m.weight.device)
                  for name, m in layers.items()}
        for module in layers.values():
            module.weight.requires_grad_(True)
        original = {name: m.weight.detach().clone() for name, m in layers.items()}
        try:
            for r in range(self.config.search_rounds):
                for module in layers.values():
                    module.weight.grad = None
                for b in range(self.config.search_batches):
                    loss, _ = self.batch_loss(r * self.config.search_batches + b, stream=1)
                    loss.backward()
                scores = torch.cat([(m.weight * m.weight.grad).sum(1).masked_fill(closed[n], -torch.inf)
                                    for n, m in layers.items()])
                k = min(self.config.neurons_per_round, int((scores > 0).sum()))
                if k == 0:
                    break
                picked = torch.topk(scores, k).indices
                offsets = 0
                with torch.no_grad():
                    for name, module in layers.items():
                        rows = picked[(picked >= offsets) & (picked < offsets + len(closed[name]))] - offsets
                        closed[name][rows] = True
                        module.weight[rows] = 0
                        offsets += len(closed[name])
        finally:
            with torch.no_grad():
                for name, module in layers.items():
                    module.weight.copy_(original[name])
                    module.weight.requires_grad_(False)
                    module.weight.grad = None
        return {name: mask.nonzero().flatten() for name, mask in closed.items() if mask.any()}

    def _prepare(self):
        layers = cross_attention_kv(self.pipe.unet)
        self._scales = torch.nn.ModuleDict()
        neurons = self.search()
        if not neurons:
            raise ConceptError("Cones found no concept neurons: no cross-attention channel lowers the concept's loss "
                               "when switched off (try more search batches, or another concept)")
        for name, index in neurons.items():
            scale = ChannelScale(index, torch.zeros(len(index), device=index.device))
            parametrize.register_parametrization(layers[name], "weight", scale)
            self._scales[_key(name)] = scale
        return self._scales, list(self._scales.parameters())

    def _finish(self) -> None:
        for module in cross_attention_kv(self.pipe.unet).values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self.pipe.unet.requires_grad_(False)
        self.neurons = {k: (m.index.cpu(), m.scale.detach().cpu()) for k, m in self._scales.items()}

    @property
    def neuron_count(self) -> int:
        return sum(len(index) for index, _ in self.neurons.values())

    def _save_artifact(self, directory: Path) -> None:
        tensors = {}
        for key, (index, scale) in self.neurons.items():
            tensors[f"{key}.index"] = index.contiguous()
            tensors[f"{key}.scale"] = scale.contiguous()
        save_file(tensors, str(directory / WEIGHTS))

    def _load_artifact(self, directory: Path) -> None:
        self.neurons = read_neurons(directory)
        apply_neurons(self.pipe.unet, self.neurons)


Neurons = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer key -> (channel indices, scalings)


def read_neurons(directory: Path) -> Neurons:
    tensors = load_file(str(Path(directory) / WEIGHTS))
    return {k[: -len(".index")]: (v, tensors[k[: -len(".index")] + ".scale"]) for k, v in tensors.items()
            if k.endswith(".index")}


def union_neurons(parts: list[Neurons]) -> Neurons:
    """All concepts' neurons; a channel several concepts hold gets the product of their scalings."""
    merged: dict[str, dict[int, float]] = {}
    for part in parts:
        for key, (index, scale) in part.items():
            layer = merged.setdefault(key, {})
            for i, s in zip(index.tolist(), scale.tolist()):
                layer[i] = layer.get(i, 1.0) * s
    return {key: (torch.tensor(sorted(layer)), torch.tensor([layer[i] for i in sorted(layer)]))
            for key, layer in merged.items()}


@torch.no_grad()
def apply_neurons(unet, neurons: Neurons) -> None:
    """Scale the neurons' channels in place."""
    layers = {_key(n): m for n, m in cross_attention_kv(unet).items()}
    unknown = sorted(set(neurons) - set(layers))
    if unknown:
        raise ValueError(f"concept neurons name layers this UNet lacks, e.g. {unknown[0]}")
    for key, (index, scale) in neurons.items():
        weight = layers[key].weight
        weight.copy_(scale_rows(weight, index.to(weight.device), scale.to(weight.device)))


def union(pipe, artifacts: list[Path]) -> Cones:
    """Several separately found concepts in one pipeline (modified in place)."""
    if not artifacts:
        raise ValueError("union needs at least one Cones artifact")
    parts = [Cones.from_manifest(pipe, Path(a)) for a in artifacts]
    combined = Cones(pipe, parts[0].config)
    combined.concepts = [c for part in parts for c in part.concepts]
    combined.neurons = union_neurons([read_neurons(Path(a)) for a in artifacts])
    for a in artifacts:
        combined.load_identifiers(Path(a))
    apply_neurons(pipe.unet, combined.neurons)
    return combined
