"""The base class of the attention losses: what a loss reads, and the loss itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import TrainingSettingsError
from ..probes import LayerRecord
from ..settings import TrainingSettings


class AttentionLoss:
    """One attention loss on the probes' records of a training pass.

    ``needs_masks``: it reads the face masks (the trainer refuses to start without them).
    ``needs_reference``: it reads the reference prompt's attention (the probes compute it only then).
    """

    name: str = ""
    needs_masks: bool = False
    needs_reference: bool = False

    def __call__(self, records: Sequence[LayerRecord], masks: torch.Tensor | None) -> torch.Tensor:
        """A scalar loss; ``masks`` (B, H, W) are the face masks of the batch's photos, 1 = face."""
        raise NotImplementedError

    def terms(self, records: Sequence[LayerRecord], masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Each loss this one is made of, by name (their sum is the loss): the trainer reports each
        term's value and its share of the gradient separately."""
        return {self.name: self(records, masks)}

    def term_scales(self, settings: TrainingSettings) -> dict[str, float]:
        """Each term's factor on top of attention_weight (the loss is λ × Σ factor × term)."""
        return {self.name: 1.0}

    def required_masks(self, masks: torch.Tensor | None) -> torch.Tensor:
        if masks is None:
            raise TrainingSettingsError(f"The '{self.name}' attention loss needs face masks: give the trainer face masks, "
                                f"or choose an attention_mode that needs none.")
        return masks

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
