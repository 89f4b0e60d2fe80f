"""Face masks drawn from a detector's box, and the detector they use when no face backend is connected.
Plain torch."""

from __future__ import annotations

import torch

from ..errors import FaceAnalysisError, FaceDetectorUnavailable
from .types import Box, FaceDetector


def built_in_detector() -> FaceDetector:
    """The face detector of face masks without a connected face backend: dlib's HOG detector (requirements.txt).

    It replaced scikit-image's LBP cascade (removed in 0.3.0): on the package photos of bench/face_backends.py the
    cascade found no face that dlib's HOG missed, missed two of the six in insightface's t1.jpg and the
    cameraman, and had three false hits (one in the mirrored astronaut, two in t1.jpg); HOG found them all,
    with none.
    """
    from .dlib import HOG_MODEL, MODELS, DlibBackend

    try:
        return DlibBackend(MODELS[HOG_MODEL])  # fast, and finds the frontal faces training photos have
    except FaceAnalysisError as error:  # dlib or its model package not installed
        raise FaceDetectorUnavailable(f"The built-in face detector (dlib) cannot run: {error}") from error


def ellipse_mask(height: int, width: int, box: Box) -> torch.Tensor:
    """A face mask (H, W) from a detector's box: an ellipse a little larger than the box, which
    covers the forehead and chin that detector boxes cut off."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx, ry = max((x2 - x1) * 0.55, 1.0), max((y2 - y1) * 0.65, 1.0)
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, -1) + 0.5
    return ((((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) <= 1.0).float()
