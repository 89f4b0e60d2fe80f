"""The identity embedding of reference photos, over any FaceBackend: detect, choose a face, embed it,
combine the photos, and with a CLIP encoder encode the aligned face crops. Plain numpy / torch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import FaceAnalysisError, NoFaceError
from .images import rgb_photos
from .preview import draw_faces
from .types import DetectedFaces, FaceBackend, FaceEmbedding, FaceSource

log = logging.getLogger("idfuse.faces")

# The aligned crop the CLIP vision model sees, for SD1.5 and SDXL alike: IP-Adapter's FaceID-Plus / PlusV2 training
# and demo code (SDXL included) crop with insightface's norm_crop at 224, the ViT-H input size. (The ComfyUI
# IP-Adapter pack crops SDXL faces at 256 and lets CLIP resize: norm_crop then keeps the 224 template's scale and
# adds a 16 px margin left and right and 32 px below, so the face ends up smaller than what the weights saw.)
CLIP_CROP_SIZE = 224
# OpenAI CLIP's pixel normalisation mean (ViT-H/14 uses the same); CLIP models normalise as (pixel - mean) / std.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
FACE_CHOICES = ("largest", "index")
COMBINE_MODES = ("normalized mean", "mean")
NO_FACE_ACTIONS = ("error", "skip")

# Maps aligned face crops, float [K, 224, 224, 3] RGB in 0..1, to CLIP hidden states [K, T, C].
ClipEncoder = Callable[[torch.Tensor], torch.Tensor]


def choose_face(faces: DetectedFaces, face_choice: str, face_index: int, photo: str) -> int:
    if face_choice == "largest":
        return faces.largest()
    if face_choice == "index":
        if not 0 <= face_index < len(faces):
            raise FaceAnalysisError(f"{photo} has {len(faces)} face(s) (indices 0 to {len(faces) - 1}, left to "
                                    f"right), so face_index {face_index} does not exist. Lower face_index or "
                                    f"use face_choice 'largest'.")
        return face_index
    raise FaceAnalysisError(f"Unknown face_choice '{face_choice}'; use one of {', '.join(FACE_CHOICES)}.")


def combine_embeddings(per_photo: torch.Tensor, combine: str) -> torch.Tensor:
    """[N, D] -> [1, D]: the mean, or the mean scaled back to unit length ('normalized mean')."""
    mean = per_photo.mean(dim=0, keepdim=True)
    if combine == "mean":
        return mean
    if combine == "normalized mean":
        return torch.nn.functional.normalize(mean, dim=-1)
    raise FaceAnalysisError(f"Unknown combine mode '{combine}'; use one of {', '.join(COMBINE_MODES)}.")


def _photo_label(index: int, count: int, rgb: np.ndarray) -> str:
    return f"photo {index + 1} of {count} ({rgb.shape[1]}x{rgb.shape[0]} px)"


def embed_faces(backend: FaceBackend, images: torch.Tensor, face_choice: str = "largest", face_index: int = 0,
                combine: str = "normalized mean", on_no_face: str = "error",
                clip_encoder: ClipEncoder | None = None,
                clip_unconditional: Callable[[], torch.Tensor] | None = None) -> tuple[FaceEmbedding, torch.Tensor]:
    """The ID embedding of the face in each photo of a ComfyUI IMAGE batch, and a preview batch.

    Each photo: detect, choose a face, embed it with the backend and, with a CLIP encoder, encode its
    aligned 224 crop. With a CLIP encoder the unconditional features are computed once too: by
    ``clip_unconditional()`` ([1, T, C], the all-zero normalised input exactly), else by encoding
    ``unconditional_clip_image()`` (zero to within CLIP_MEAN's 8-bit rounding). Photos without a face are an
    error naming them, or with on_no_face='skip' are left out.
    """
    if on_no_face not in NO_FACE_ACTIONS:
        raise FaceAnalysisError(f"Unknown on_no_face '{on_no_face}'; use one of {', '.join(NO_FACE_ACTIONS)}.")
    if combine not in COMBINE_MODES:
        raise FaceAnalysisError(f"Unknown combine mode '{combine}'; use one of {', '.join(COMBINE_MODES)}.")
    if not isinstance(backend, FaceBackend):
        raise FaceAnalysisError(f"face_analysis is a {type(backend).__name__}, which cannot embed faces; connect "
                                f"IDFuse Load Face Analysis.")
    photos = rgb_photos(images, "image")
    detections = [backend.detect(rgb) for rgb in photos]
    count = len(photos)

    missing = [i for i, faces in enumerate(detections) if len(faces) == 0]
    if missing and (on_no_face == "error" or len(missing) == count):
        names = ", ".join(_photo_label(i, count, photos[i]) for i in missing)
        searched = detections[missing[0]].searched
        advice = "Use photos where the face is clearly visible and not tiny"
        advice += (", or set on_no_face to 'skip' to leave those photos out." if len(missing) < count else ".")
        raise NoFaceError(f"No face found in {names}{f' ({searched})' if searched else ''}. {advice}")
    for i in missing:
        log.warning("No face in %s; skipped (on_no_face = skip)", _photo_label(i, count, photos[i]))

    chosen: dict[int, int] = {}
    embeddings, boxes, keypoints, sources, crops = [], [], [], [], []
    for i, (rgb, faces) in enumerate(zip(photos, detections, strict=True)):
        if len(faces) == 0:
            continue
        pick = choose_face(faces, face_choice, face_index, _photo_label(i, count, rgb))
        chosen[i] = pick
        face = faces[pick]
        if face.keypoints is None:
            raise FaceAnalysisError(f"{backend.name} found the face in {_photo_label(i, count, rgb)} without its "
                                    f"five keypoints, which alignment needs; connect IDFuse Load Face Analysis.")
        embeddings.append(backend.embed(rgb, face))
        boxes.append(face.box)
        keypoints.append(face.keypoints)
        sources.append(FaceSource(photo=i + 1, width=rgb.shape[1], height=rgb.shape[0], face=pick,
                                  faces_found=len(faces), det_size=faces.det_size, score=face.score))
        if clip_encoder is not None:
            crops.append(backend.align(rgb, face.keypoints, CLIP_CROP_SIZE))
        log.info("Face embed: %s", sources[-1])

    per_photo = torch.from_numpy(np.stack(embeddings))
    clip_hidden = clip_hidden_uncond = None
    if clip_encoder is not None:
        clip_hidden = encode_crops(clip_encoder, crops)
        if clip_unconditional is not None:
            clip_hidden_uncond = checked_clip_hidden(clip_unconditional(), 1, "the unconditional image")
        else:
            clip_hidden_uncond = encode_clip_images(clip_encoder, unconditional_clip_image())
    embedding = FaceEmbedding(
        arcface=combine_embeddings(per_photo, combine), clip_hidden=clip_hidden, per_photo_arcface=per_photo,
        boxes=torch.from_numpy(np.stack(boxes)), keypoints=torch.from_numpy(np.stack(keypoints)),
        embedding_space=backend.embedding_space, sources=tuple(sources), combine=combine,
        clip_hidden_uncond=clip_hidden_uncond, backend=backend.name)
    preview = torch.stack([torch.from_numpy(draw_faces(rgb, faces, chosen.get(i)))
                           for i, (rgb, faces) in enumerate(zip(photos, detections, strict=True))])
    return embedding, preview.float() / 255.0


def encode_crops(clip_encoder: ClipEncoder, crops: list[np.ndarray]) -> torch.Tensor:
    """Mean CLIP hidden states [1, T, C] of the aligned 224 crops (always a plain mean: they are features, not
    unit vectors)."""
    return encode_clip_images(clip_encoder, torch.from_numpy(np.stack(crops)).float() / 255.0)


def eight_bit(values: Sequence[float]) -> tuple[float, ...]:
    """Values in 0..1 rounded to the 8-bit levels image preprocessing rounds pixels to."""
    return tuple(round(255 * float(v)) / 255 for v in values)


def unconditional_clip_image(mean: Sequence[float] = CLIP_MEAN, size: int = CLIP_CROP_SIZE) -> torch.Tensor:
    """The image whose CLIP features are the negative of FaceID-Plus / PlusV2 (and IDFuse) encoders: [1, size,
    size, 3] of the model's normalisation mean, rounded to 8 bits.

    IP-Adapter's reference inference and its training code (the dropped image of classifier-free training)
    encode ``torch.zeros_like(clip_image)``, an all-zero tensor *after* CLIP's normalisation: in pixel space
    that is this mean-coloured grey, so its features are what the weights saw as "no face". (The ComfyUI
    IP-Adapter pack encodes a black image instead, which normalises to -mean/std, about -1.8: another input.)
    Preprocessing rounds pixels to 8 bits, so with the model's own mean the normalised image is zero only to
    within 0.5/255/std (< 0.008), which a ViT's first layer normalisation can amplify: normalising with this
    rounded mean (nodes/glue/clip_vision.py does) makes it exactly zero.
    """
    return torch.tensor(eight_bit(mean), dtype=torch.float32).expand(1, size, size, 3).contiguous()


def checked_clip_hidden(hidden: object, count: int, what: str) -> torch.Tensor:
    """A CLIP encoder's output for ``count`` images, checked to be hidden states [count, tokens, width]."""
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.shape[0] != count:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise FaceAnalysisError(f"The CLIP vision model returned {shape} for {what}; expected hidden states "
                                f"[{count}, tokens, width]. Use a CLIP vision model (e.g. ViT-H/14) in the "
                                f"clip_vision input.")
    return hidden.detach().to("cpu", torch.float32)


def encode_clip_images(clip_encoder: ClipEncoder, images: torch.Tensor) -> torch.Tensor:
    """Mean CLIP hidden states [1, T, C] of images [K, H, W, 3] in 0..1."""
    count = images.shape[0]
    return checked_clip_hidden(clip_encoder(images), count, f"{count} image(s)").mean(dim=0, keepdim=True)
