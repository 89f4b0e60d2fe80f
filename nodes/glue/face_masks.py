"""Face masks for the trainer's photos: insightface's detector when connected, else the built-in
cascade (models/faces/cascade.py). The IDFuse Face Masks node (nodes/faces.py) shows them."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from ...models.errors import TrainingError
from ...models.faces.cascade import Box, CascadeFaceDetector, FaceDetectorUnavailable, ellipse_mask
from ...models.training.photos import rgb_photos

log = logging.getLogger(__name__)

Detector = Callable[[np.ndarray], Box | None]


def _insightface_detector(analysis) -> Detector:
    from ...models.faces.insightface import detect_faces, detection_sizes

    sizes = detection_sizes(analysis)

    def detect(rgb: np.ndarray) -> Box | None:
        faces = detect_faces(analysis, rgb, sizes)
        if len(faces) == 0:
            return None
        return tuple(float(v) for v in faces.boxes[int(faces.areas.argmax())])
    return detect


def face_detector(face_analysis=None) -> Detector:
    """insightface's detector when a FACE_ANALYSIS is given, else the built-in cascade."""
    if face_analysis is not None:
        return _insightface_detector(face_analysis)
    try:
        return CascadeFaceDetector()
    except FaceDetectorUnavailable as e:
        raise TrainingError(f"{e} Or connect face masks, or IDFuse Load Face Analysis to 'face_analysis'.") from e


def find_faces(photos: torch.Tensor, detect: Detector) -> tuple[list[Box | None], list[int]]:
    """The main face's box in each photo (IMAGE (P, H, W, C)), and the 1-based numbers of photos without one."""
    boxes = [detect((photo.numpy() * 255).round().astype(np.uint8)) for photo in rgb_photos(photos)]
    return boxes, [index + 1 for index, box in enumerate(boxes) if box is None]


def no_face_message(missing: list[int], count: int) -> str:
    return (f"No face found in photo(s) {missing} of {count}. Use photos with a clear, frontal face, connect face "
            f"masks (or IDFuse Load Face Analysis, which also finds turned faces), or use attention_mode "
            f"reference_prompt, which needs no mask.")


def face_masks(photos: torch.Tensor, face_analysis, required: bool) -> torch.Tensor | None:
    """Face masks (P, H, W) for photos without a MASK input. ``required``: the attention loss needs
    them, so no face is an error; otherwise the report just has no face share."""
    try:
        detect = face_detector(face_analysis)
    except TrainingError:
        if required:
            raise
        log.info("IDFuse trainer: no masks and no face detector; the report will have no face share.")
        return None
    boxes, missing = find_faces(photos, detect)
    if missing:
        if required:
            raise TrainingError(no_face_message(missing, len(photos)))
        log.info("IDFuse trainer: no face found in photo(s) %s; the report will have no face share.", missing)
        return None
    height, width = photos.shape[1:3]
    return torch.stack([ellipse_mask(height, width, box) for box in boxes])


def mask_preview(photos: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The photos with everything outside the mask dimmed: IMAGE (P, H, W, 3)."""
    shade = 0.3 + 0.7 * masks.unsqueeze(-1)
    return (rgb_photos(photos) * shade).clamp(0, 1)
