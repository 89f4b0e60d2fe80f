"""The attention losses of identity training, one file each, registered in ATTENTION_LOSSES below.

A loss reads the probes' records of a pass (``probes.LayerRecord``: the placeholder's attention per
layer, and the initialiser's in the reference prompt) and says what else it needs; the method is
described in docs/METHOD.md §1.7. Adding a loss: its own file with an ``AttentionLoss`` subclass, and one
entry in ATTENTION_LOSSES (its ``name`` is the trainer's attention_mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import TrainingSettingsError
from ..probes import LayerRecord
from .base import AttentionLoss
from .combined import CombinedLoss
from .face_mask import FaceMaskLoss, face_mask_loss
from .off import NoAttentionLoss
from .reference_prompt import ReferencePromptLoss, reference_loss

_FACE_MASK = FaceMaskLoss()
_REFERENCE_PROMPT = ReferencePromptLoss()

# In the order of the trainer node's attention_mode dropdown (saved workflows store the chosen name).
ATTENTION_LOSSES: list[AttentionLoss] = [
    _FACE_MASK,
    _REFERENCE_PROMPT,
    CombinedLoss("both", (_FACE_MASK, _REFERENCE_PROMPT)),
    NoAttentionLoss(),
]

ATTENTION_MODES = tuple(loss.name for loss in ATTENTION_LOSSES)
# For callers that only have the mode's name (the node deciding whether it must find faces).
MASK_MODES = tuple(loss.name for loss in ATTENTION_LOSSES if loss.needs_masks)
REFERENCE_MODES = tuple(loss.name for loss in ATTENTION_LOSSES if loss.needs_reference)


def attention_loss_for(mode: str) -> AttentionLoss:
    for loss in ATTENTION_LOSSES:
        if loss.name == mode:
            return loss
    names = ", ".join(loss.name for loss in ATTENTION_LOSSES)
    raise TrainingSettingsError(f"Unknown attention-loss mode '{mode}'; use one of {names}.")


def attention_loss(mode: str, records: Sequence[LayerRecord], masks: torch.Tensor | None) -> torch.Tensor:
    return attention_loss_for(mode)(records, masks)


__all__ = [
    "ATTENTION_LOSSES", "ATTENTION_MODES", "MASK_MODES", "REFERENCE_MODES", "AttentionLoss", "CombinedLoss",
    "FaceMaskLoss", "NoAttentionLoss", "ReferencePromptLoss", "attention_loss", "attention_loss_for",
    "face_mask_loss", "reference_loss",
]
