"""Face masks for training photos that come without one: a face box, drawn as an ellipse.

The detector that works on every install is scikit-image's bundled LBP frontal-face cascade
(OpenCV's ``lbpcascade_frontalface``, shipped inside scikit-image: no download and no OpenCV,
whose 5.x wheels no longer carry cascades). It finds frontal and near-frontal faces, which is
what identity photos are; insightface, when connected, finds the rest. Plain numpy/torch.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FaceDetectorUnavailable

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


def ellipse_mask(height: int, width: int, box: Box) -> torch.Tensor:
    """A face mask (H, W) from a detector's box: an ellipse a little larger than the box, which
    covers the forehead and chin that detector boxes cut off."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx, ry = max((x2 - x1) * 0.55, 1.0), max((y2 - y1) * 0.65, 1.0)
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, -1) + 0.5
    return ((((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) <= 1.0).float()


class CascadeFaceDetector:
    """scikit-image's LBP frontal-face cascade; ``detector(rgb uint8 (H, W, 3))`` -> the largest face's box or None."""

    WORK_SIDE = 384  # photos are searched at most this large: the cascade's cost grows with the pixel count
    SCALE_STEP = 1.1
    MIN_FACE = 0.1  # smallest face searched, as a share of the photo's shorter side
    # Overlapping hits needed to accept a face: a real face fires at many neighbouring positions and
    # scales, chance patterns at few. 6 keeps every face of insightface's group photo and no false hit
    # on scikit-image's sample photos (tests/test_face_masks.py).
    MIN_NEIGHBOURS = 6

    def __init__(self):
        try:
            from skimage import data
            from skimage.feature import Cascade
        except ImportError as e:
            raise FaceDetectorUnavailable("The built-in face detector needs scikit-image (pip install "
                                          "scikit-image).") from e
        self._cascade = Cascade(data.lbp_frontal_face_cascade_filename())

    def __call__(self, rgb: np.ndarray) -> Box | None:
        grey = _grey(rgb)
        scale = min(1.0, self.WORK_SIDE / max(grey.shape))
        if scale < 1.0:
            from skimage.transform import rescale

            grey = rescale(grey, scale, anti_aliasing=True)
        side = max(24, int(min(grey.shape) * self.MIN_FACE))
        if side > min(grey.shape):
            return None
        found = self._cascade.detect_multi_scale(grey, scale_factor=self.SCALE_STEP, step_ratio=1,
                                                 min_size=(side, side), max_size=grey.shape,
                                                 min_neighbor_number=self.MIN_NEIGHBOURS)
        if not found:
            return None
        face = max(found, key=lambda f: f["width"] * f["height"])
        return tuple(float(v) / scale for v in (face["c"], face["r"], face["c"] + face["width"],
                                                face["r"] + face["height"]))


def _grey(rgb: np.ndarray) -> np.ndarray:
    """Luma in [0, 1] (ITU-R 601 weights, as OpenCV and scikit-image use)."""
    pixels = np.asarray(rgb, dtype=np.float64)[..., :3] / 255.0
    return np.ascontiguousarray(pixels @ np.array([0.299, 0.587, 0.114]))
