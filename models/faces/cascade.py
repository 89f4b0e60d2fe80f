"""The built-in face detector for face masks: scikit-image's bundled LBP frontal-face cascade.

It is OpenCV's ``lbpcascade_frontalface``, shipped inside scikit-image: no download and no OpenCV,
whose 5.x wheels no longer carry cascades. It finds frontal and near-frontal faces, which is what
identity photos are; insightface, when connected, finds the rest. A detect-only backend
(types.FaceDetector): it finds no landmarks, so it cannot align or embed. Plain numpy.
"""

from __future__ import annotations

import numpy as np

from ..errors import FaceDetectorUnavailable
from .types import DetectedFaces


class CascadeFaceDetector:
    """scikit-image's LBP frontal-face cascade: ``detect(rgb uint8 (H, W, 3))`` gives the faces found, without
    keypoints."""

    name = "scikit-image frontal-face cascade"
    WORK_SIDE = 384  # photos are searched at most this large: the cascade's cost grows with the pixel count
    SCALE_STEP = 1.1
    MIN_FACE = 0.1  # smallest face searched, as a share of the photo's shorter side
    # Overlapping hits needed to accept a face: a real face fires at many neighbouring positions and
    # scales, chance patterns at few. 6 keeps every face of insightface's group photo and no false hit
    # on scikit-image's sample photos (tests/faces/test_face_masks.py).
    MIN_NEIGHBOURS = 6

    def __init__(self):
        try:
            from skimage import data
            from skimage.feature import Cascade
        except ImportError as e:
            raise FaceDetectorUnavailable("The built-in face detector needs scikit-image (pip install "
                                          "scikit-image).") from e
        self._cascade = Cascade(data.lbp_frontal_face_cascade_filename())

    def detect(self, rgb: np.ndarray) -> DetectedFaces:
        grey = _grey(rgb)
        scale = min(1.0, self.WORK_SIDE / max(grey.shape))
        if scale < 1.0:
            from skimage.transform import rescale

            grey = rescale(grey, scale, anti_aliasing=True)
        side = max(24, int(min(grey.shape) * self.MIN_FACE))
        if side > min(grey.shape):
            return DetectedFaces.none_found(with_keypoints=False)
        found = self._cascade.detect_multi_scale(grey, scale_factor=self.SCALE_STEP, step_ratio=1,
                                                 min_size=(side, side), max_size=grey.shape,
                                                 min_neighbor_number=self.MIN_NEIGHBOURS)
        if not found:
            return DetectedFaces.none_found(with_keypoints=False)
        boxes = np.array([(f["c"], f["r"], f["c"] + f["width"], f["r"] + f["height"]) for f in found],
                         dtype=np.float64) / scale
        # The cascade gives no confidence: every face it accepts counts the same.
        return DetectedFaces.left_to_right(boxes, np.ones(len(boxes)), None)


def _grey(rgb: np.ndarray) -> np.ndarray:
    """Luma in [0, 1] (ITU-R 601 weights, as OpenCV and scikit-image use)."""
    pixels = np.asarray(rgb, dtype=np.float64)[..., :3] / 255.0
    return np.ascontiguousarray(pixels @ np.array([0.299, 0.587, 0.114]))
