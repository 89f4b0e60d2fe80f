"""The Face Embed preview: detected faces drawn on the photo; the label font and line breaking every
preview of the pack draws its text with."""

from __future__ import annotations

import numpy as np

from .types import DetectedFaces

CHOSEN_COLOUR = (0, 220, 0)
OTHER_COLOUR = (255, 200, 0)
NO_FACE_COLOUR = (230, 0, 0)
# left eye, right eye, nose tip, left and right mouth corner (types.KEYPOINT_NAMES)
KEYPOINT_COLOURS = ((0, 120, 255), (0, 120, 255), (255, 0, 0), (255, 0, 255), (255, 0, 255))


def draw_faces(rgb: np.ndarray, faces: DetectedFaces, chosen: int | None) -> np.ndarray:
    """The photo with every detected box (chosen face green, others amber, labelled with their index) and
    the five keypoints where the detector gives them; a red frame where no face was found."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    line = max(1, round(max(rgb.shape[:2]) / 256))
    if len(faces) == 0:
        draw.rectangle([0, 0, rgb.shape[1] - 1, rgb.shape[0] - 1], outline=NO_FACE_COLOUR, width=2 * line)
    for index in range(len(faces)):
        face = faces[index]
        colour = CHOSEN_COLOUR if index == chosen else OTHER_COLOUR
        draw.rectangle([float(v) for v in face.box], outline=colour, width=(2 if index == chosen else 1) * line)
        draw.text((float(face.box[0]) + 2 * line, float(face.box[1]) + line), str(index), fill=colour)
        if face.keypoints is None:
            continue
        radius = 1.5 * line
        for (x, y), point_colour in zip(face.keypoints, KEYPOINT_COLOURS, strict=True):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=point_colour)
    return np.array(picture, dtype=np.uint8)  # a writable copy, for torch.from_numpy


def label_font(size: int):
    """Pillow's default font at ``size`` px, for labels drawn on previews."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or without FreeType: the small bitmap font
        return ImageFont.load_default()


def wrap_label(draw, text: str, font, width: float, lines: int) -> list[str]:
    """A label for ``draw``: the text broken at spaces into at most ``lines`` lines of at most ``width`` pixels
    (a word wider than that is cut), the last ending in "..." when the text did not fit."""
    pieces = []
    for word in text.split():
        while len(word) > 1 and draw.textlength(word, font=font) > width:
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            pieces.append(word[:cut])
            word = word[cut:]
        pieces.append(word)
    result, line = [], ""
    for piece in pieces:
        candidate = f"{line} {piece}" if line else piece
        if not line or draw.textlength(candidate, font=font) <= width:
            line = candidate
        else:
            result.append(line)
            line = piece
    if line:
        result.append(line)
    if len(result) > lines:
        last = result[lines - 1]
        while last and draw.textlength(f"{last}...", font=font) > width:
            last = last[:-1]
        result = [*result[:lines - 1], f"{last}..."]
    return result
