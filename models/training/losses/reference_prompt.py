"""reference_prompt: the placeholder attends where the initialiser word does in a reference prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from ...errors import TrainingError
from ..probes import LayerRecord
from ..settings import TrainingSettings
from .base import AttentionLoss


def reference_loss(records: Sequence[LayerRecord]) -> torch.Tensor:
    """MSE(A_t, A_r) averaged over layers: A_t = the placeholder's column with the identity prompt's keys,
    A_r = the initialiser's column with the reference prompt's keys, both from the same query Q of the
    same pass (A_r detached unless the probes were told otherwise)."""
    losses = [F.mse_loss(r.target, r.reference) for r in records if r.reference is not None]
    if not losses:
        raise TrainingError("The 'reference_prompt' attention loss needs the reference prompt's attention, but the "
                            "probes recorded none: the batch was given without a reference context.")
    return torch.stack(losses).mean()


class ReferencePromptLoss(AttentionLoss):
    name = "reference_prompt"
    needs_reference = True

    def term_scales(self, settings: TrainingSettings) -> dict[str, float]:
        # Its MSE between attention probabilities is far smaller than face_mask's difference of region
        # means, so it has its own factor (reference_loss_scale; docs/METHOD.md gives the measured shares).
        return {self.name: settings.reference_loss_scale}

    def __call__(self, records: Sequence[LayerRecord], masks: torch.Tensor | None) -> torch.Tensor:
        return reference_loss(records)
