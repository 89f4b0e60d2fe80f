"""Photo helpers of the face tests: uint8 photos as a ComfyUI IMAGE batch, and a face pasted onto a wall."""

from __future__ import annotations

import numpy as np
import torch


def as_image(*photos: np.ndarray) -> torch.Tensor:
    """uint8 RGB photos of one size -> a ComfyUI IMAGE batch."""
    return torch.from_numpy(np.stack(photos)).float() / 255.0


def on_canvas(face: np.ndarray, side: int, at: tuple[int, int], canvas: np.ndarray | None = None) -> np.ndarray:
    """A face photo resized to side x side on a plain grey 512x512 wall (a 'portrait on a wall', what the
    synthetic detector finds)."""
    import cv2

    canvas = np.full((512, 512, 3), 128, np.uint8) if canvas is None else canvas.copy()
    x, y = at
    canvas[y:y + side, x:x + side] = cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC)
    return canvas
