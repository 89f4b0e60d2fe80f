"""A sum of attention losses (``both`` = face_mask + reference_prompt): it reads what its parts read."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..probes import LayerRecord
from ..settings import TrainingSettings
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

    def terms(self, records: Sequence[LayerRecord], masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The parts' terms; a term that two parts give is their sum."""
        terms: dict[str, torch.Tensor] = {}
        for part in self.parts:
            for name, term in part.terms(records, masks).items():
                terms[name] = term if name not in terms else terms[name] + term
        return terms

    def term_scales(self, settings: TrainingSettings) -> dict[str, float]:
        return {name: scale for part in self.parts for name, scale in part.term_scales(settings).items()}

    def __call__(self, records: Sequence[LayerRecord], masks: torch.Tensor | None) -> torch.Tensor:
        return torch.stack([part(records, masks) for part in self.parts]).sum()
