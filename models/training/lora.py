"""LoRA adapters trained beside the identity: a low-rank update of frozen Linear layers, applied
through forward hooks so the frozen model (and every clone sharing it) is never changed."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F


class LoRAAdapter(nn.Module):
    """Low-rank update ``up @ down * alpha / rank`` of one frozen Linear layer (kohya / ComfyUI layout)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.down = nn.Parameter((torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound)
        # Zero up-projection: training starts from the unchanged model.
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.alpha = float(rank if alpha is None else alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.up @ self.down) * self.scale


@contextmanager
def lora_hooks(layers: dict[str, nn.Module], adapters: nn.ModuleDict) -> Iterator[None]:
    """Add each adapter's output to its frozen layer's output while the context is open.

    ``layers`` and ``adapters`` share keys. Forward hooks leave the layer (and every clone of a
    ComfyUI model that shares it) untouched once the context closes.
    """
    handles = []

    def make_hook(adapter: LoRAAdapter):
        def hook(_module, args, output):
            x = args[0]
            return output + adapter(x.to(adapter.down.dtype)).to(output.dtype)
        return hook

    try:
        for key, layer in layers.items():
            handles.append(layer.register_forward_hook(make_hook(adapters[key])))
        yield
    finally:
        for handle in handles:
            handle.remove()
