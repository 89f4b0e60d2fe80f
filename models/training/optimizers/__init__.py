"""The optimisers of identity training, one file each, registered in OPTIMIZER_KINDS below.

Their names are settings.OPTIMIZERS (the ``optimizer`` widget's vocabulary; saved workflows and training
states store the name). Adding one: its own file with an ``OptimizerKind`` subclass, one entry in
OPTIMIZER_KINDS and its name in settings.OPTIMIZERS. Their state is saved and restored by loop.py
(optimizer_state / load_optimizer_state), whatever it holds.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ...errors import TrainingSettingsError
from .adamw import AdamW
from .adamw8bit import AdamW8bit
from .base import OptimizerKind
from .prodigy import Prodigy

# In the order of the optimizer dropdown (settings.OPTIMIZERS).
OPTIMIZER_KINDS: list[OptimizerKind] = [
    AdamW(),
    AdamW8bit(),
    Prodigy(),
]


def optimizer_kind(name: str) -> OptimizerKind:
    for kind in OPTIMIZER_KINDS:
        if kind.name == name:
            return kind
    names = ", ".join(kind.name for kind in OPTIMIZER_KINDS)
    raise TrainingSettingsError(f"optimizer '{name}' is not one of {names}; choose one in IDFuse Training Options.")


def available_optimizers() -> list[str]:
    """The names of the optimisers that can run on this machine."""
    return [kind.name for kind in OPTIMIZER_KINDS if kind.unavailable_reason() is None]


def make_optimizer(name: str, parameters: Iterable[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
    """The optimiser ``name`` over ``parameters``; a TrainingError says why and what to do where it cannot run."""
    kind = optimizer_kind(name)
    kind.require()
    return kind.create(list(parameters), learning_rate)


def kind_of(optimizer: torch.optim.Optimizer) -> OptimizerKind | None:
    """The kind that made ``optimizer`` (None: an optimiser from elsewhere)."""
    return next((kind for kind in OPTIMIZER_KINDS if kind.made(optimizer)), None)


__all__ = ["OPTIMIZER_KINDS", "AdamW", "AdamW8bit", "OptimizerKind", "Prodigy", "available_optimizers", "kind_of",
           "make_optimizer", "optimizer_kind"]
