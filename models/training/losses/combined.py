"""A sum of attention losses (``both`` = face_mask + reference_prompt): it reads what its parts read."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..probes import LayerRecord
from .base import AttentionLoss


class CombinedLoss(AttentionLoss):
    def __init__(self, name: str, parts: Sequence[AttentionLoss]):
        self.name = name
        self.parts = tuple(parts)

    @property
    def needs_masks(self) -> bool:
        return any(part.needs_masks for part in self.parts)

    @property
    def needs_reference(self) -> bool:
        return any(part.needs_reference for part in self.parts)

    def __call__(self, records: Sequence[LayerRecord], masks: torch.Tensor | None) -> torch.Tensor:
        return torch.stack([part(records, masks) for part in self.parts]).sum()
