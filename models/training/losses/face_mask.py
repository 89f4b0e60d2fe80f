"""face_mask: the placeholder's attention pulled onto the face (FastComposer's localisation loss)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...unet import masks_on_grid
from ..probes import LayerRecord
from .base import AttentionLoss


def face_mask_loss(records: Sequence[LayerRecord], masks: torch.Tensor) -> torch.Tensor:
    """mean(A over the background) − mean(A over the face), per photo and layer, averaged.

    The means are over each region (FastComposer's localisation loss), not over the whole map: a
    whole-map mean of A·background outweighs A·face by the background's larger area, so it falls
    fastest by silencing the token everywhere rather than by moving its attention onto the face.
    Region means make attention spread evenly cost nothing; only moving it onto the face pays.
    The masks are resized to each layer's grid.
    """
    losses = []
    for record in records:
        face = masks_on_grid(masks, record.grid).to(record.target.device)
        background = 1 - face
        face_mean = (record.target * face).sum(1) / face.sum(1).clamp_min(1e-6)
        background_mean = (record.target * background).sum(1) / background.sum(1).clamp_min(1e-6)
        losses.append((background_mean - face_mean).mean())
    return torch.stack(losses).mean()


class FaceMaskLoss(AttentionLoss):
    name = "face_mask"
    needs_masks = True

    def __call__(self, records: Sequence[LayerRecord], masks: torch.Tensor | None) -> torch.Tensor:
        return face_mask_loss(records, self.required_masks(masks))
