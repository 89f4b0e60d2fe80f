"""The base class of the trainer's optimisers: its name, whether it can run here, and how to make it."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from ...errors import TrainingError


class OptimizerKind:
    """One optimiser of the ``optimizer`` setting.

    ``name``: the setting's value (settings.OPTIMIZERS; saved workflows and training states store it).
    ``package``: the optional package it comes from (None: torch's own), whose import means it may be in use.
    """

    name: str = ""
    package: str | None = None

    def unavailable_reason(self) -> str | None:
        """None when it can run on this machine, else why not and the fix (the end of the error's sentence)."""
        return None

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        """Its optimiser class, imported only when asked for (the packages are optional)."""
        raise NotImplementedError

    def create(self, parameters: Sequence[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
        raise NotImplementedError

    def require(self) -> None:
        """Refuse, naming the setting, why and the fix, where it cannot run."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise TrainingError(f"optimizer {self.name} (IDFuse Training Options) cannot run here: {reason}")

    def made(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` is one of this kind (without importing a package that is not in use)."""
        if self.package is not None and self.package not in sys.modules:
            return False
        return type(optimizer) is self.optimizer_class()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
