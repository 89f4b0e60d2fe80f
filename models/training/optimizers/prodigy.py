"""Prodigy (prodigyopt): Adam that estimates its own step size d as it trains. learning_rate multiplies
d, so 1.0 is its convention; the LR schedules scale it the same way."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from .base import OptimizerKind

log = logging.getLogger("idfuse.training")

CONVENTIONAL_LEARNING_RATE = 1.0
# A learning_rate further than this factor from 1.0 gets a warning: most likely an AdamW rate left in place.
WARN_BEYOND_FACTOR = 10.0


class Prodigy(OptimizerKind):
    name = "Prodigy"
    package = "prodigyopt"

    def unavailable_reason(self) -> str | None:
        try:
            self.optimizer_class()
        except ImportError:
            return ("it needs the prodigyopt package, which is not installed: pip install prodigyopt (it is in the "
                    "pack's requirements-train.txt), or choose AdamW.")
        return None

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        from prodigyopt import Prodigy as optimizer_class

        return optimizer_class

    def create(self, parameters: Sequence[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
        factor = learning_rate / CONVENTIONAL_LEARNING_RATE
        if not 1.0 / WARN_BEYOND_FACTOR <= factor <= WARN_BEYOND_FACTOR:
            log.warning("learning_rate %g with the Prodigy optimizer: Prodigy estimates its own step size and "
                        "multiplies it by learning_rate, so 1.0 is its convention; %g makes every step %g times "
                        "the size Prodigy estimates. Set learning_rate to 1.0 unless you mean that.",
                        learning_rate, learning_rate, factor)
        return self.optimizer_class()(parameters, lr=learning_rate, weight_decay=0.0)
