"""off: no attention loss (diffusion loss only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..probes import LayerRecord
from .base import AttentionLoss


class NoAttentionLoss(AttentionLoss):
    name = "off"

    def __call__(self, records: Sequence[LayerRecord], masks: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros(())
