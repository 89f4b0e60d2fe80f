"""off: no attention loss (diffusion loss only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..probes import LayerRecord
from ..settings import TrainingSettings
from .base import AttentionLoss


class NoAttentionLoss(AttentionLoss):
    name = "off"

    def __call__(self, records: Sequence[LayerRecord], masks: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros(())

    def term_scales(self, settings: TrainingSettings) -> dict[str, float]:
        return {}

    def terms(self, records: Sequence[LayerRecord], masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {}
