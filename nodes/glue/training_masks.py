"""Face masks of training photos, for the trainer and IDFuse Face Masks: the detector of the connected face backend
(IDFuse Load Face Analysis), else the built-in one, dlib's HOG detector (models/faces/masks.py)."""

from __future__ import annotations

import logging

import torch

from ...models.errors import FaceDetectorUnavailable, NoFaceInTrainingPhotoError, TrainingFaceDetectorUnavailable
from ...models.faces import as_face_detector
from ...models.faces.images import to_uint8
from ...models.faces.masks import built_in_detector, ellipse_mask
from ...models.faces.types import Box, FaceDetector
from ...models.training.photos import rgb_photos

log = logging.getLogger("idfuse.nodes")


def face_detector(face_analysis=None, for_trainer: bool = False) -> FaceDetector:
    """The connected face backend's detector when a FACE_ANALYSIS is given, else the built-in one (dlib HOG)."""
    if face_analysis is not None:
        return as_face_detector(face_analysis)
    try:
        return built_in_detector()
    except FaceDetectorUnavailable as e:
        other = "connect face masks to masks, or " if for_trainer else ""
        raise TrainingFaceDetectorUnavailable(f"{e} Or {other}connect IDFuse Load Face Analysis to face_analysis.") from e


def find_faces(photos: torch.Tensor, detector: FaceDetector) -> tuple[list[Box | None], list[int]]:
    """The main (largest) face's box in each photo (IMAGE (P, H, W, C)), and the 1-based numbers of photos
    without one. The photos are converted as every face detector of the pack sees them (faces/images.py)."""
    boxes = [detector.detect(to_uint8(photo)).largest_box() for photo in rgb_photos(photos)]
    return boxes, [index + 1 for index, box in enumerate(boxes) if box is None]


def no_face_message(missing: list[int], count: int, for_trainer: bool = False,
                    face_analysis_connected: bool = False) -> str:
    """What to do about photos without a face, in the terms of the node that needs the masks."""
    remedies = ["use photos with a clear, frontal face"]
    if for_trainer:
        remedies.append("connect face masks to masks")
    if not face_analysis_connected:
        remedies.append("connect IDFuse Load Face Analysis to face_analysis (insightface or dlib CNN also find "
                        "turned faces)")
    remedies.append("use attention_mode reference_prompt, which needs no mask" if for_trainer
                    else "paint the masks yourself")
    advice = ", ".join(remedies[:-1]) + f", or {remedies[-1]}"
    return f"No face found in photo(s) {missing} of {count}. {advice[0].upper()}{advice[1:]}."


def face_masks(photos: torch.Tensor, face_analysis, required: bool, for_trainer: bool = False) -> torch.Tensor | None:
    """Face masks (P, H, W) for photos without a MASK input. ``required``: the caller needs them (the
    attention loss, IDFuse Face Masks), so no face is an error; otherwise the report just has no face share.
    ``for_trainer``: messages name the trainer's inputs (masks, attention_mode) as ways out."""
    try:
        detector = face_detector(face_analysis, for_trainer)
    except FaceDetectorUnavailable:
        if required:
            raise
        log.info("No masks and no face detector; the training report will have no face share.")
        return None
    boxes, missing = find_faces(photos, detector)
    if missing:
        if required:
            raise NoFaceInTrainingPhotoError(no_face_message(missing, len(photos), for_trainer, face_analysis is not None))
        log.info("No face found in photo(s) %s by the %s; the training report will have no face share.", missing,
                 detector.name)
        return None
    height, width = photos.shape[1:3]
    return torch.stack([ellipse_mask(height, width, box) for box in boxes])


def mask_preview(photos: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The photos with everything outside the mask dimmed: IMAGE (P, H, W, 3)."""
    shade = 0.3 + 0.7 * masks.unsqueeze(-1)
    return (rgb_photos(photos) * shade).clamp(0, 1)
