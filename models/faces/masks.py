"""Face masks drawn from a detector's box. Plain torch."""

from __future__ import annotations

import torch

from .types import Box


def ellipse_mask(height: int, width: int, box: Box) -> torch.Tensor:
    """A face mask (H, W) from a detector's box: an ellipse a little larger than the box, which
    covers the forehead and chin that detector boxes cut off."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx, ry = max((x2 - x1) * 0.55, 1.0), max((y2 - y1) * 0.65, 1.0)
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, -1) + 0.5
    return ((((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) <= 1.0).float()
