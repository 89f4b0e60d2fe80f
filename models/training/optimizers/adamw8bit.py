"""AdamW with 8-bit moments (bitsandbytes): about a quarter of AdamW's optimiser memory. Offered only
with a CUDA GPU, where bitsandbytes' 8-bit optimisers are made to run."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import OptimizerKind

INSTALL_HINT = "pip install bitsandbytes"


class AdamW8bit(OptimizerKind):
    name = "AdamW8bit"
    package = "bitsandbytes"

    def unavailable_reason(self) -> str | None:
        if not torch.cuda.is_available():
            return (f"it needs a CUDA GPU (bitsandbytes' 8-bit optimiser) and this machine has none. Choose AdamW, "
                    f"or train on a machine with a CUDA GPU and bitsandbytes installed ({INSTALL_HINT}).")
        try:
            self.optimizer_class()
        except Exception as e:  # not installed, or installed without a working CUDA setup (RuntimeError, OSError)
            return (f"it needs the bitsandbytes package, which does not import here ({type(e).__name__}: {e}). "
                    f"Install it ({INSTALL_HINT}), or choose AdamW.")
        return None

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        from bitsandbytes.optim import AdamW8bit as optimizer_class

        return optimizer_class

    def create(self, parameters: Sequence[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
        return self.optimizer_class()(parameters, lr=learning_rate, weight_decay=0.0)
