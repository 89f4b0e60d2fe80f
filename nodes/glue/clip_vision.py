"""ComfyUI's CLIP vision model as the face code needs it."""

from __future__ import annotations

import copy

import torch

from ...models.faces.embed import CLIP_CROP_SIZE, CLIP_MEAN, eight_bit, unconditional_clip_image


def clip_vision_penultimate(clip_vision, crops: torch.Tensor) -> torch.Tensor:
    """ComfyUI CLIP_VISION -> penultimate hidden states [K, 257, 1280] (ViT-H/14) of IMAGE crops [K, 224, 224, 3]."""
    return clip_vision.encode_image(crops).penultimate_hidden_states


def clip_vision_unconditional(clip_vision) -> torch.Tensor:
    """Penultimate hidden states [1, 257, 1280] of the all-zero normalised image, IP-Adapter's negative
    (models.faces.embed.unconditional_clip_image says why).

    ComfyUI's preprocessing rounds pixels to 8 bits before it subtracts the model's mean, which no 8-bit
    grey equals; so a copy of the model that normalises with the 8-bit-rounded mean encodes the image of that
    grey: what the network sees is then zero exactly, through ComfyUI's own loading, device and dtype handling.
    """
    mean = getattr(clip_vision, "image_mean", None)
    mean = CLIP_MEAN if mean is None or len(mean) != 3 else mean
    size = getattr(clip_vision, "image_size", CLIP_CROP_SIZE)
    zero_point = copy.copy(clip_vision)  # shares the model and its patcher; only the normalisation differs
    zero_point.image_mean = list(eight_bit(mean))
    return clip_vision_penultimate(zero_point, unconditional_clip_image(mean, size))
