"""The loss curve as a picture: the node's loss_curve output and the progress-bar preview."""

from __future__ import annotations

import numpy as np
import torch

from .token_trainer import LossHistory


def render_loss_curve(history: LossHistory, size: tuple[int, int] = (768, 384), as_pil: bool = False):
    """Diffusion (top) and attention (bottom) loss per step; a ComfyUI IMAGE (1, H, W, 3) or a PIL image."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    panels = (("diffusion loss", [s.diffusion for s in history.steps], (40, 90, 200)),
              ("attention loss", [s.attention for s in history.steps], (200, 70, 40)))
    panel_h = height // 2
    for row, (label, values, colour) in enumerate(panels):
        top, margin = row * panel_h, 8
        draw.rectangle([0, top, width - 1, top + panel_h - 1], outline=(200, 200, 200))
        if values:
            low, high = min(values), max(values)
            span = (high - low) or 1.0
            steps = max(len(values) - 1, 1)
            points = [(margin + (width - 2 * margin) * i / steps,
                       top + margin + 14 + (panel_h - 2 * margin - 14) * (1 - (v - low) / span))
                      for i, v in enumerate(values)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            else:
                draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
            label = f"{label}: last {values[-1]:.4g}  (min {low:.4g}, max {high:.4g}, {len(values)} steps)"
        draw.text((margin, top + 2), label, fill=(0, 0, 0))
    if as_pil:
        return image
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
