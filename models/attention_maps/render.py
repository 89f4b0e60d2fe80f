"""Attention maps as pictures: a heat map over the decoded image, and each word's share inside face boxes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..faces.preview import label_font
from ..faces.types import Box

# Dark blue (no attention) -> blue -> cyan -> yellow -> red (the word's strongest attention in the picture).
HEAT_STOPS = torch.tensor([[0.0, 0.0, 0.35], [0.0, 0.25, 1.0], [0.0, 0.9, 1.0], [1.0, 0.9, 0.0], [1.0, 0.0, 0.0]])
BOX_COLOUR = (255, 255, 255)


def normalised(attention: torch.Tensor) -> torch.Tensor:
    """A map (..., H, W) scaled so that its largest value is 1 (all zeros stays zeros)."""
    peak = attention.flatten(-2).amax(-1)[..., None, None]
    return attention / peak.clamp_min(1e-12)


def heat_colours(values: torch.Tensor) -> torch.Tensor:
    """Values in 0..1 (H, W) -> RGB (H, W, 3) along HEAT_STOPS, linearly between stops."""
    scaled = values.clamp(0.0, 1.0) * (len(HEAT_STOPS) - 1)
    low = scaled.floor().long().clamp_max(len(HEAT_STOPS) - 2)
    fraction = (scaled - low)[..., None]
    return torch.lerp(HEAT_STOPS[low], HEAT_STOPS[low + 1], fraction)


def heat_overlay(image: torch.Tensor, attention: torch.Tensor, opacity: float) -> torch.Tensor:
    """The picture (H, W, 3 in 0..1) with the map's heat colours blended over it (opacity 0 = the picture)."""
    return torch.lerp(image[..., :3].float(), heat_colours(normalised(attention)), float(opacity))


def box_share(attention: torch.Tensor, box: Box) -> float:
    """Share (0..1) of a map's (H, W) total attention inside a box (x1, y1, x2, y2 in its pixels)."""
    height, width = attention.shape
    x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x2, y2 = min(width, int(np.ceil(box[2]))), min(height, int(np.ceil(box[3])))
    total = float(attention.sum())
    if total <= 0.0 or x2 <= x1 or y2 <= y1:
        return 0.0
    return float(attention[y1:y2, x1:x2].sum()) / total


def draw_labels(rgb: np.ndarray, word: str, boxes: np.ndarray, shares: Sequence[float]) -> np.ndarray:
    """The heat map with the word written top left and each face box drawn with the word's share in it."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    side = max(rgb.shape[:2])
    font = label_font(max(10, round(side / 28)))
    line = max(1, round(side / 256))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    draw.rectangle([0, 0, right - left + 6, bottom - top + 6], fill=(0, 0, 0))
    draw.text((3 - left, 3 - top), word, font=font, fill=(255, 255, 255))
    for box, share in zip(boxes, shares, strict=True):
        draw.rectangle([float(v) for v in box], outline=BOX_COLOUR, width=2 * line)
        text = f"{share:.0%}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x, y = float(box[0]), max(0.0, float(box[1]) - (bottom - top) - 4)
        draw.rectangle([x, y, x + right - left + 2, y + bottom - top + 2], fill=(0, 0, 0))
        draw.text((x + 1 - left, y + 1 - top), text, font=font, fill=BOX_COLOUR)
    return np.array(picture, dtype=np.uint8)


def share_table(words: Sequence[str], shares: Sequence[Sequence[Sequence[float]]], summary: str) -> str:
    """Text table: per image and word, the share of the word's attention inside each face (left to right).
    ``shares[image][word][face]``; an image without faces says so."""
    lines = [f"Attention inside each face box ({summary})"]
    for image, per_word in enumerate(shares):
        faces = len(per_word[0]) if per_word else 0
        if faces == 0:
            lines.append(f"image {image + 1}: no face found")
            continue
        header = "  ".join(f"face {f + 1:<3}" for f in range(faces))
        lines.append(f"image {image + 1}: {'word':<16}{header}")
        for word, row in zip(words, per_word, strict=True):
            lines.append(f"         {word:<16}" + "  ".join(f"{s:>7.1%}" for s in row))
    return "\n".join(lines)
