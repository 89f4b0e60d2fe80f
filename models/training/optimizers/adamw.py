"""AdamW, the default: torch's own, without weight decay (the trained vectors are not pulled to zero)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import OptimizerKind


class AdamW(OptimizerKind):
    name = "AdamW"

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return torch.optim.AdamW

    def create(self, parameters: Sequence[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
