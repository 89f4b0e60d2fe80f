"""ComfyUI's CLIP vision model as the face code needs it."""

from __future__ import annotations

import torch


def clip_vision_penultimate(clip_vision, crops: torch.Tensor) -> torch.Tensor:
    """ComfyUI CLIP_VISION -> penultimate hidden states [K, 257, 1280] (ViT-H/14) of IMAGE crops [K, 224, 224, 3]."""
    return clip_vision.encode_image(crops).penultimate_hidden_states
