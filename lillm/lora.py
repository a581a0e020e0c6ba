"""LoRA (Hu et al. 2021): fine-tune a frozen weight W through a low-rank update, W + (alpha / r) * B @ A.

Only A (r x in) and B (out x r) train, a small fraction of the parameters; B starts at zero so the adapted
model starts exactly equal to the base. After training the update is folded into W ("merged"), so the saved
model is a plain LilLM with no extra cost at inference.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear (a copy of the base, bias and dtype included) whose weight includes the update."""
        linear = copy.deepcopy(self.base)
        with torch.no_grad():
            linear.weight += self.scale * self.lora_b @ self.lora_a
        return linear.requires_grad_(True)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS) -> int:
    """Freeze every parameter of model, wrap the targeted Linears with LoRA; return the trainable count."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"no Linear named one of {targets} was found to adapt")
    return trainable


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged Linear, in place; returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Just the adapter matrices (for resuming a LoRA run)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(("lora_a", "lora_b"))}
