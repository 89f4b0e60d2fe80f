"""Sample images of a training run as pictures, plain torch and PIL: one round (the sample prompts side by
side, each labelled, under the step) as saved in <save_name>.samples/, and the grid of a run's rounds (a row
per prompt, a column per round) of IDFuse Train Identity's samples output."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..faces.preview import label_font, wrap_label

# The grid of many rounds is shrunk (cells alike) so that neither side passes this many pixels: a long run
# sampled often would otherwise make an IMAGE of hundreds of megabytes.
MAX_GRID_SIDE = 8192
FONT_SIZE = 14  # at least; labels grow with the cells (a 512 px cell gets 21 px)
LINE_SPACING = 4
MARGIN = 6
MAX_LABEL_LINES = 3
ROW_LABEL_WIDTH = 200  # at least; 2/5 of a wider cell
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def row_label_width(cell_width: int) -> int:
    """Width of the column of prompt labels left of the grid's cells."""
    return max(ROW_LABEL_WIDTH, cell_width * 2 // 5)


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return bottom - top + LINE_SPACING


def _to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image.float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))


def labelled_grid(cells: torch.Tensor, column_labels: Sequence[str], row_labels: Sequence[str] | None = None,
                  title: str | None = None):
    """Images (rows, columns, H, W, 3) in [0, 1] as one PIL image: an optional title line, each column's label
    (wrapped) above it, each row's label (wrapped) at its left."""
    from PIL import Image, ImageDraw

    rows, columns, height, width = cells.shape[:4]
    font = label_font(max(FONT_SIZE, width // 24))
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = _line_height(font)
    column_text = [wrap_label(scratch, label, font, width - 2 * MARGIN, MAX_LABEL_LINES) for label in column_labels]
    header = MARGIN + line * max((len(t) for t in column_text), default=0)
    title_height = MARGIN + line if title else 0
    label_width = row_label_width(width) if row_labels is not None else 0
    row_text = ([wrap_label(scratch, label, font, label_width - 2 * MARGIN, max(1, height // line))
                 for label in row_labels] if row_labels is not None else [])
    picture = Image.new("RGB", (label_width + columns * width, title_height + header + rows * height), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    if title:
        draw.text((MARGIN, MARGIN // 2), title, fill=INK, font=font)
    for column, text in enumerate(column_text):
        for number, text_line in enumerate(text):
            draw.text((label_width + column * width + MARGIN, title_height + MARGIN // 2 + number * line), text_line,
                      fill=INK, font=font)
    for row in range(rows):
        top = title_height + header + row * height
        for number, text_line in enumerate(row_text[row] if row_text else []):
            draw.text((MARGIN, top + MARGIN + number * line), text_line, fill=INK, font=font)
        for column in range(columns):
            picture.paste(_to_pil(cells[row, column]), (label_width + column * width, top))
    return picture


def round_picture(images: torch.Tensor, prompts: Sequence[str], step: int):
    """One sample round: the images (P, H, W, 3) of the P prompts side by side, each under its prompt, with
    the step as the title (a PIL image, the PNG saved for the round)."""
    return labelled_grid(images.unsqueeze(0), prompts, title=f"step {step}")


def _shrunk(cells: torch.Tensor, rows: int, columns: int, extra: tuple[int, int]) -> torch.Tensor:
    """Cells (N, H, W, 3) scaled down alike when the grid would pass MAX_GRID_SIDE."""
    height, width = cells.shape[1:3]
    scale = min(1.0, (MAX_GRID_SIDE - extra[0]) / (rows * height), (MAX_GRID_SIDE - extra[1]) / (columns * width))
    if scale >= 1.0:
        return cells
    size = (max(16, int(height * scale)), max(16, int(width * scale)))
    return torch.nn.functional.interpolate(cells.movedim(-1, 1), size=size, mode="bilinear", antialias=True,
                                           align_corners=False).movedim(1, -1)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] from float or uint8 (0-255) pixels."""
    return images.float().cpu() / 255.0 if images.dtype == torch.uint8 else images.float().cpu()


def samples_grid(rounds: Sequence[tuple[int, torch.Tensor]], prompts: Sequence[str]) -> torch.Tensor:
    """The rounds [(step, images (P, H, W, 3), float in [0, 1] or uint8)] as a ComfyUI IMAGE (1, H', W', 3): a
    row per prompt (labelled with it), a column per round (labelled with its step)."""
    columns = [_as_float(images) for _step, images in rounds]
    cells = torch.stack(columns, dim=1)  # (P, R, H, W, 3)
    rows, count = cells.shape[:2]
    width = cells.shape[3]  # labels are sized for the cells before shrinking: the most they can take
    labels = (2 * MARGIN + 2 * max(FONT_SIZE, width // 24), row_label_width(width))
    flat = _shrunk(cells.flatten(0, 1), rows, count, labels)
    cells = flat.view(rows, count, *flat.shape[1:])
    picture = labelled_grid(cells, [f"step {step}" for step, _images in rounds], prompts)
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).unsqueeze(0)


def message_image(text: str, size: tuple[int, int] = (64, 320)) -> torch.Tensor:
    """A small white IMAGE (1, H, W, 3) with a line of text: the samples output of a run without samples."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (size[1], size[0]), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    font = label_font(FONT_SIZE)
    for number, line in enumerate(wrap_label(draw, text, font, size[1] - 2 * MARGIN, MAX_LABEL_LINES)):
        draw.text((MARGIN, MARGIN + number * _line_height(font)), line, fill=INK, font=font)
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).unsqueeze(0)


def preview_picture(loss_curve, latest_round=None, width: int = 512):
    """The progress-bar preview: the loss curve (a PIL image), with the latest sample round under it once
    there is one, both at ``width``."""
    from PIL import Image

    parts = [loss_curve] + ([latest_round] if latest_round is not None else [])
    scaled = [p.resize((width, max(1, round(p.height * width / p.width))), Image.LANCZOS) for p in parts]
    picture = Image.new("RGB", (width, sum(p.height for p in scaled)), BACKGROUND)
    top = 0
    for part in scaled:
        picture.paste(part, (0, top))
        top += part.height
    return picture
