"""Low-rank adapters (LoRA, Hu et al. 2021) for the frozen LLM's linear layers: y = W x + (alpha / r) B A x, with
B zero-initialised so training starts from the unchanged model. Adapters are kept unmerged for training and
storage, and merged into W (W += scale * B A) when the full checkpoint is assembled."""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.lora_a.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def add_lora(layers: nn.Module, rank: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    """Wraps every target linear under `layers` (the LLM's decoder layers); returns them by qualified name."""
    generator = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name, module in list(layers.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha, generator)
                setattr(module, child_name, lora)
                wrapped[f"{name}.{child_name}" if name else child_name] = lora
    return wrapped


def lora_state(wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, lora in wrapped.items():
        out[f"{name}.lora_a"] = lora.lora_a.detach()
        out[f"{name}.lora_b"] = lora.lora_b.detach()
    return out


def load_lora_state(wrapped: dict[str, LoRALinear], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, lora in wrapped.items():
            lora.lora_a.copy_(state[f"{name}.lora_a"])
            lora.lora_b.copy_(state[f"{name}.lora_b"])


def merge_lora(layers: nn.Module, state: dict[str, torch.Tensor], scale: float) -> int:
    """W += scale * B A for every adapter in `state` (names relative to `layers`); returns how many merged."""
    merged = 0
    modules = dict(layers.named_modules())
    with torch.no_grad():
        for key in state:
            if not key.endswith(".lora_a"):
                continue
            name = key[: -len(".lora_a")]
            linear = modules[name]
            a, b = state[key].float(), state[f"{name}.lora_b"].float()
            linear.weight += (scale * (b @ a)).to(linear.weight.dtype)
            merged += 1
    return merged
