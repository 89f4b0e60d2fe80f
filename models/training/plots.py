"""Training as pictures: the loss curve (the node's loss_curve output and the progress-bar preview) and
the placeholder's attention on each photo before and after training (the attention_maps output)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from .token_trainer import LossHistory, gradient_shares

# Colours of the attention terms in the gradient-share panel, in the order of their names.
SHARE_COLOURS = ((200, 70, 40), (40, 150, 70), (140, 60, 170))
DIFFUSION_COLOUR = (40, 90, 200)
VALIDATION_COLOUR = (230, 130, 0)


def render_loss_curve(history: LossHistory, size: tuple[int, int] = (768, 384), as_pil: bool = False):
    """Diffusion and attention loss per step (the validation loss, when measured, as points on the
    diffusion panel's scale) and, once measured, each attention term's share of the token vectors'
    gradient (0-100 %); a ComfyUI IMAGE (1, H, W, 3) or a PIL image."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps = [s.step for s in history.steps]
    validation = [(step, value) for step, value in history.validation if math.isfinite(value)]
    # Each series: steps, values, colour, and whether each value is marked with a dot (sparse measurements).
    diffusion = [(steps, [s.diffusion for s in history.steps], DIFFUSION_COLOUR, False)]
    if validation:
        diffusion.append(([step for step, _ in validation], [value for _, value in validation], VALIDATION_COLOUR,
                          True))
    panels = [("diffusion loss", diffusion, None),
              ("attention loss", [(steps, [s.attention for s in history.steps], (200, 70, 40), False)], None)]
    measured = [s for s in history.steps if s.gradient_norms and "tokens" in s.gradient_norms]
    names = sorted({n for s in measured for n in s.gradient_norms["tokens"]} - {"diffusion"})
    if names:
        shares = [gradient_shares(s.gradient_norms["tokens"]) for s in measured]
        series = [([s.step for s in measured], [share.get(n, 0.0) for share in shares], colour, False)
                  for n, colour in zip(names, SHARE_COLOURS, strict=False)]
        last = ", ".join(f"{n} {100 * shares[-1].get(n, 0.0):.3g}%" for n in names)
        panels.append((f"share of the token gradient: {last} (step {measured[-1].step})", series, (0.0, 1.0)))
    panel_h = height // len(panels)
    all_steps = steps + [step for step, _ in validation]
    x_range = (min(all_steps, default=0), max(all_steps, default=0))
    for row, (label, series, y_range) in enumerate(panels):
        top = row * panel_h
        draw.rectangle([0, top, width - 1, top + panel_h - 1], outline=(200, 200, 200))
        # A panel's lines share its scale (the training and validation loss are comparable).
        scale = y_range or _value_range([v for _, values, _, _ in series for v in values])
        for xs, values, colour, points in series:
            _draw_series(draw, xs, values, colour, (top, panel_h, width), x_range, scale, points)
        values = series[0][1]
        if values and y_range is None:
            low, high = min(values), max(values)
            label = f"{label}: last {values[-1]:.4g}  (min {low:.4g}, max {high:.4g}, {len(values)} steps)"
        draw.text((8, top + 2), label, fill=(0, 0, 0))
        if row == 0 and validation:
            _validation_label(draw, validation[-1], draw.textlength(label) + 16, top, width)
    if as_pil:
        return image
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)


def _value_range(values: list[float]) -> tuple[float, float] | None:
    return (min(values), max(values)) if values else None


def _validation_label(draw, last: tuple[int, float], left: float, top: int, width: int) -> None:
    """The last validation loss, in its colour: after the panel's label, or under it when that is full."""
    step, value = last
    text = f"validation: last {value:.4g} (step {step})"
    if left + draw.textlength(text) > width - 8:
        left, top = 8, top + 12
    draw.text((left, top + 2), text, fill=VALIDATION_COLOUR)


def _draw_series(draw, xs: list[int], values: list[float], colour, panel: tuple[int, int, int],
                 x_range: tuple[int, int], y_range: tuple[float, float] | None, points: bool = False) -> None:
    """One line in a panel (top, height, width): x by step over the history's steps, y over ``y_range``
    (or the values' own range); ``points`` marks each value with a dot as well."""
    if not values:
        return
    top, panel_h, width = panel
    margin = 8
    low, high = y_range if y_range is not None else (min(values), max(values))
    span = (high - low) or 1.0
    steps = (x_range[1] - x_range[0]) or 1
    xy = [(margin + (width - 2 * margin) * (x - x_range[0]) / steps,
           top + margin + 14 + (panel_h - 2 * margin - 14) * (1 - (v - low) / span))
          for x, v in zip(xs, values, strict=True)]
    if len(xy) > 1:
        draw.line(xy, fill=colour, width=2)
    for x, y in xy if points or len(xy) == 1 else ():
        radius = 3 if points else 2
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)


def _heat(values: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> (..., 3) black-red-yellow-white colours."""
    v = values.clamp(0, 1).unsqueeze(-1)
    return torch.cat([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], -1)


def render_attention_panels(photos: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                            share_before: torch.Tensor | None, share_after: torch.Tensor | None,
                            masks: torch.Tensor | None = None) -> torch.Tensor:
    """Per photo: the photo | attention before | attention after, as a ComfyUI IMAGE (P, H, 3W, 3).

    Each map is scaled from its own minimum (black) to maximum (white): it shows where the
    placeholder attends; how much of it is on the face is the share written on it.
    The face mask's outline is drawn on the photo; the share inside it is written on each map.
    """
    from PIL import Image, ImageDraw

    count, height, width = photos.shape[:3]
    panels = []
    for index in range(count):
        maps = torch.stack([before[index], after[index]]).float()
        maps = F.interpolate(maps.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
        maps = (maps - low) / (high - low).clamp_min(1e-12)
        photo = photos[index].float().cpu()
        overlays = [0.35 * photo + 0.65 * _heat(m) for m in maps]
        row = torch.cat([photo, *overlays], dim=1)
        image = Image.fromarray((row.clamp(0, 1).numpy() * 255).round().astype("uint8"))
        draw = ImageDraw.Draw(image)
        if masks is not None:
            edge = masks[index] > 0.5
            border = edge & F.max_pool2d((~edge).float()[None, None], 3, 1, 1)[0, 0].bool()
            ys, xs = torch.nonzero(border, as_tuple=True)
            for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
                draw.point((x, y), fill=(0, 255, 0))
        for column, (label, shares) in enumerate((("before", share_before), ("after", share_after)), start=1):
            text = label if shares is None else f"{label}: {100 * float(shares[index]):.0f}% on face"
            draw.text((column * width + 4, 4), text, fill=(255, 255, 255))
        panels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0))
    return torch.stack(panels)
