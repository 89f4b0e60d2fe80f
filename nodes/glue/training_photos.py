"""Training photos from a folder (IDFuse Load Training Photos) on ComfyUI: the folder below ComfyUI's input folder,
and the photos at the training resolution, cropped square around the face, for the trainer."""

from __future__ import annotations

import logging
from pathlib import Path

import folder_paths
import torch

from ...models.errors import IDFuseInputError, NoFaceInTrainingPhotoError
from ...models.faces.masks import ellipse_mask
from ...models.training.face_crops import DEFAULT_FACE_SHARE, face_crop
from ...models.training.photo_folder import (
    TrainingPhotos,
    contact_sheet,
    folder_fingerprint,
    read_photo_folder,
    resolve_folder,
)
from .training_masks import face_detector

log = logging.getLogger("idfuse.nodes")


def photo_folder(folder: str) -> Path:
    """The folder typed in the node: absolute, or below ComfyUI's input folder."""
    return resolve_folder(folder, folder_paths.get_input_directory())


def load_training_photos(folder: str, max_photos: int, caption_extension: str, on_no_face: str
                         ) -> tuple[TrainingPhotos, torch.Tensor, str]:
    """The node's outputs: the photos, their contact sheet and the report."""
    photos = read_photo_folder(photo_folder(folder), caption_extension, max_photos, on_no_face)
    return photos, contact_sheet(photos.photos), photos.report()


def folder_state(folder: str) -> str:
    """IS_CHANGED of the node: the folder's fingerprint (names, sizes, modification times), so ComfyUI reads it
    again when a file changes. A folder that cannot be read gives the error's text (the node then runs and
    raises it)."""
    try:
        return folder_fingerprint(photo_folder(folder))
    except (IDFuseInputError, OSError) as error:
        return f"unreadable: {error}"


def photos_at_resolution(training_photos: TrainingPhotos, face_analysis, resolution: int,
                         placeholder: str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None, list[str | None]]:
    """The photos as the trainer takes them: each photo's largest face found (the connected face backend, else
    the built-in dlib HOG detector, as the trainer's masks), the square around it at the face share of the ID
    encoder's crops (``face_crops.face_crop``: never padded, never squashed; upscaled when the photo is too
    small) at resolution², its face mask (the trainer's ellipse from the box), and its caption's template
    (None without a caption; ``placeholder``, the trainer's word, is found in captions that name the person).

    Returns images [P, R, R, 3] float in 0..1, masks [P, R, R], templates (one per photo). A photo without a face
    is an error naming its file, or left out (with its template) when the node's on_no_face is skip."""
    detector = face_detector(face_analysis, for_trainer=True)
    crops, masks, templates, missing = [], [], [], []
    for photo, template in zip(training_photos.photos, training_photos.templates(placeholder), strict=True):
        box = detector.detect(photo.pixels.numpy()).largest_box()
        if box is None:
            missing.append(photo.name)
            continue
        crop = face_crop(photo.pixels, box, resolution, DEFAULT_FACE_SHARE)
        if crop.upscaled:
            log.info("%s: the square around the face is %d px, under the training resolution %d; upscaled "
                     "(a larger photo gives a sharper crop)", photo.name, crop.square.side, resolution)
        log.debug("%s: face %s, crop %s of %dx%d", photo.name, [round(v) for v in box], crop.square.box,
                  photo.width, photo.height)
        crops.append(crop.pixels)
        masks.append(ellipse_mask(resolution, resolution, crop.face_box))
        templates.append(template)
    if missing:
        where = f"{', '.join(missing)} in {training_photos.folder}"
        if training_photos.on_no_face != "skip" or not crops:
            remedies = [f"remove {'it' if len(missing) == 1 else 'them'} from the folder"]
            if training_photos.on_no_face != "skip":
                remedies.append("set on_no_face to skip on IDFuse Load Training Photos")
            if face_analysis is None:
                remedies.append("connect IDFuse Load Face Analysis to face_analysis (insightface or dlib CNN also "
                                "find turned faces)")
            advice = ", ".join(remedies)
            raise NoFaceInTrainingPhotoError(
                f"No face found by the {detector.name} in {where}; the trainer crops each photo around its face. "
                f"{advice[0].upper()}{advice[1:]}, or use photos with a clear, frontal face.")
        log.warning("No face found by the %s in %s; left out of training", detector.name, where)
    images = torch.stack(crops).float() / 255.0
    return images, torch.stack(masks), templates
