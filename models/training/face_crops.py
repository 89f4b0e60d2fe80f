"""Square training crops centred on a face: the one home of the crop geometry, for the ID encoder's face dataset
(``scripts/prepare_faces.py``) and the identity trainer's photo folders (IDFuse Load Training Photos). Plain torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

# The face box (brows to chin, cheek to cheek) takes this share of the crop's side: a head-and-shoulders portrait,
# with room for hair and the neck, which is how most prompts frame a person.
DEFAULT_FACE_SHARE = 0.4


@dataclass(frozen=True)
class FaceSquare:
    """A square of a photo, in the photo's pixels: columns left..left+side, rows top..top+side."""

    left: int
    top: int
    side: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """x1, y1, x2, y2."""
        return self.left, self.top, self.left + self.side, self.top + self.side


@dataclass(frozen=True)
class FaceCrop:
    pixels: torch.Tensor  # [R, R, C], the dtype of the photo (uint8 0..255, or float 0..1)
    square: FaceSquare  # where it was cut from the photo
    face_box: tuple[float, float, float, float]  # the face box in the crop's pixels (x1, y1, x2, y2)

    @property
    def upscaled(self) -> bool:
        """Whether the square had fewer pixels than the crop: the photo was too small for the resolution."""
        return self.square.side < self.pixels.shape[0]


def face_square(height: int, width: int, face_box: Sequence[float], face_share: float = DEFAULT_FACE_SHARE
                ) -> FaceSquare:
    """The square centred on the face whose side makes the face box's longer side ``face_share`` of it: at most the
    photo's shorter side (then the face takes more), shifted inside the photo (never padded)."""
    x1, y1, x2, y2 = (float(v) for v in face_box)
    side = max(1, int(round(min(max(x2 - x1, y2 - y1) / face_share, width, height))))
    left = int(round(min(max((x1 + x2) / 2 - side / 2, 0), width - side)))
    top = int(round(min(max((y1 + y2) / 2 - side / 2, 0), height - side)))
    return FaceSquare(left, top, side)


def face_crop(photo: torch.Tensor, face_box: Sequence[float], resolution: int,
              face_share: float = DEFAULT_FACE_SHARE) -> FaceCrop:
    """The face's square (``face_square``) of a photo [H, W, C] resized to resolution² (bicubic, antialiased when
    shrinking; a square is never squashed). uint8 photos give uint8 crops (rounded), float ones float in 0..1."""
    height, width = photo.shape[:2]
    square = face_square(height, width, face_box, face_share)
    left, top, side = square.left, square.top, square.side
    part = photo[top:top + side, left:left + side].movedim(-1, 0)[None].float()
    resized = F.interpolate(part, size=(resolution, resolution), mode="bicubic", align_corners=False,
                            antialias=side > resolution)[0].movedim(0, -1)
    pixels = resized.round().clamp(0, 255).to(torch.uint8) if photo.dtype == torch.uint8 else resized.clamp(0, 1)
    scale = resolution / side
    x1, y1, x2, y2 = (float(v) for v in face_box)
    crop_face = ((x1 - left) * scale, (y1 - top) * scale, (x2 - left) * scale, (y2 - top) * scale)
    return FaceCrop(pixels.contiguous(), square, crop_face)
