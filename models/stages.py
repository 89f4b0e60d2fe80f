"""Denoising-time stages of SeFi-IDE (ProSpect): stage i covers t in [1000 i/S, 1000 (i+1)/S)."""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def stage_of_timestep(timestep: torch.Tensor | float, num_stages: int,
                      num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Zero-based stage index of each timestep on the training schedule (0 = least noise)."""
    t = torch.as_tensor(timestep, dtype=torch.float64)
    stage = torch.floor(t * num_stages / num_train_timesteps).long()
    return stage.clamp_(0, num_stages - 1)
