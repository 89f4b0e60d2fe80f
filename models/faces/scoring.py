"""Identity score: how close the faces in generated images are to a reference identity, over any FaceBackend.

Per image every face is found and embedded with the backend, and compared with the reference (ID_EMBEDS, or
reference photos embedded here with the same backend): the cosine similarity for every embedding space and,
for a backend with a calibrated distance (``DistanceBackend``: dlib, whose raw descriptors of one person are
closer than 0.6), the Euclidean distance and whether it is below that threshold. The image's score is its
best-matching face's similarity; an image without a face scores 0 and says "no face".
Plain numpy / torch: nodes/scoring.py is the ComfyUI node and bench/quality.py the quality harness.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import FaceAnalysisError, IDFuseInputError, NoFaceError
from .dlib import unit_distance_threshold
from .embed import embed_faces
from .images import rgb_photos, rgb_uint8
from .preview import CHOSEN_COLOUR, NO_FACE_COLOUR, OTHER_COLOUR, draw_faces, label_font
from .types import Box, DetectedFaces, Face, FaceBackend, FaceEmbedding

log = logging.getLogger("idfuse.faces")

NO_FACE = "no face"
_EPS = 1e-12


@runtime_checkable
class DistanceBackend(Protocol):
    """A FaceBackend whose raw descriptors have a published same-person distance (dlib: 0.6); its ``embed`` is
    the descriptor scaled to unit length."""

    same_person_distance: float

    def descriptor(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """The raw descriptor of one face detected in rgb (not unit length)."""
        ...


@dataclass(frozen=True)
class Reference:
    """The identity the images are scored against, as vectors of one embedding space."""

    direction: np.ndarray  # [D] unit length: the combined embedding (cosine similarity)
    embedding_space: str
    description: str  # for the table, e.g. "2 reference photo(s)" or "ID_EMBEDS of 3 photo(s)"
    # With a DistanceBackend: the mean of the reference faces' vectors the distance is measured to, the
    # threshold, and whether those are raw descriptors (reference photos) or unit vectors (ID_EMBEDS).
    centre: np.ndarray | None = None
    threshold: float | None = None
    raw: bool = False

    @property
    def distance_note(self) -> str:
        if self.threshold is None:
            return ""
        if self.raw:
            return f"Euclidean distance of the raw descriptors, same person below {self.threshold:g}"
        return (f"Euclidean distance of unit vectors (ID_EMBEDS holds no raw descriptors), same person below "
                f"{self.threshold:.3g} (the raw 0.6 scaled by a typical descriptor length; connect the photos to "
                f"reference_images for the raw distance)")


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, _EPS)


def cosine_similarities(vectors: np.ndarray, reference: Reference) -> np.ndarray:
    """[F, D] face vectors (any length) -> [F] cosine similarity with the reference, finite (a zero vector
    gives 0)."""
    if len(vectors) == 0:
        return np.zeros((0,), dtype=np.float32)
    return np.nan_to_num(_unit(vectors) @ reference.direction, nan=0.0).astype(np.float32)


def euclidean_distances(vectors: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """[F, D] face vectors -> [F] Euclidean distance to a reference vector [D]."""
    if len(vectors) == 0:
        return np.zeros((0,), dtype=np.float32)
    return np.linalg.norm(np.asarray(vectors, dtype=np.float32) - centre, axis=-1).astype(np.float32)


def _as_array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


def reference_from_embedding(backend: FaceBackend, embedding: FaceEmbedding, description: str) -> Reference:
    """The reference of an ID_EMBEDS; with a DistanceBackend the distance is between unit vectors."""
    direction = _unit(_as_array(embedding.arcface).reshape(-1))
    if not isinstance(backend, DistanceBackend):
        return Reference(direction, embedding.embedding_space, description)
    centre = _as_array(embedding.per_photo_arcface).reshape(embedding.num_photos, -1).mean(axis=0)
    return Reference(direction, embedding.embedding_space, description, centre, unit_distance_threshold(), False)


def reference_from_photos(backend: FaceBackend, reference_images: torch.Tensor) -> Reference:
    """The reference of photos of the person: the largest face of each, photos without one left out; with a
    DistanceBackend the distance is to the mean raw descriptor of those faces."""
    try:
        embedding, _preview = embed_faces(backend, reference_images, on_no_face="skip")
    except NoFaceError as error:
        raise NoFaceError(f"reference_images: {error}") from error
    description = f"{embedding.num_photos} reference photo(s)"
    direction = _unit(_as_array(embedding.arcface).reshape(-1))
    if not isinstance(backend, DistanceBackend):
        return Reference(direction, embedding.embedding_space, description)
    photos = reference_images if reference_images.ndim == 4 else reference_images[None]
    descriptors = [backend.descriptor(rgb_uint8(photos[source.photo - 1]),
                                      Face(_as_array(box), source.score, _as_array(points)))
                   for source, box, points in zip(embedding.sources, embedding.boxes, embedding.keypoints,
                                                  strict=True)]
    centre = np.mean(np.stack([np.asarray(d, np.float32).reshape(-1) for d in descriptors]), axis=0)
    return Reference(direction, embedding.embedding_space, description, centre, backend.same_person_distance, True)


def reference_from_inputs(backend: FaceBackend, reference_images: torch.Tensor | None = None,
                          id_embeds: FaceEmbedding | None = None) -> Reference:
    """The reference of exactly one of: reference photos (embedded here) or an ID_EMBEDS of the backend's
    embedding space."""
    if (reference_images is None) == (id_embeds is None):
        given = "both" if reference_images is not None else "neither"
        raise IDFuseInputError(f"Identity score got {given} of reference_images and id_embeds; connect exactly one: "
                               f"photos of the person, or the ID_EMBEDS of IDFuse Face Embed.")
    if reference_images is not None:
        return reference_from_photos(backend, reference_images)
    if not isinstance(id_embeds, FaceEmbedding):
        raise IDFuseInputError(f"id_embeds is a {type(id_embeds).__name__}, not an ID_EMBEDS; connect the "
                               f"id_embeds output of IDFuse Face Embed.")
    if id_embeds.embedding_space != backend.embedding_space:
        raise IDFuseInputError(
            f"id_embeds holds {id_embeds.embedding_space} embeddings but face_analysis ({backend.name}) makes "
            f"{backend.embedding_space} ones: vectors of two embedding spaces cannot be compared. Embed the "
            f"reference with the same face analysis (IDFuse Face Embed), or connect the reference photos to "
            f"reference_images instead.")
    return reference_from_embedding(backend, id_embeds, f"ID_EMBEDS of {id_embeds.num_photos} photo(s)")


@dataclass(frozen=True)
class ImageScore:
    """How close one image's faces are to the reference; the best-matching face is the image's score."""

    image: int  # 0-based position in the scored batch
    width: int
    height: int
    faces: DetectedFaces
    similarities: np.ndarray  # [F] cosine similarity of each face (faces left to right)
    distances: np.ndarray | None  # [F] Euclidean distance of each face to the reference (a DistanceBackend only)
    threshold: float | None  # the same-person distance it is compared with

    @property
    def best(self) -> int | None:
        """Index of the face most like the reference; None without a face."""
        return int(np.argmax(self.similarities)) if len(self.faces) else None

    @property
    def found(self) -> bool:
        return len(self.faces) > 0

    @property
    def similarity(self) -> float:
        """The best face's cosine similarity; 0.0 without a face."""
        best = self.best
        return 0.0 if best is None else float(self.similarities[best])

    @property
    def distance(self) -> float | None:
        best = self.best
        return None if best is None or self.distances is None else float(self.distances[best])

    @property
    def same_person(self) -> bool | None:
        """Whether the best face is closer than the threshold; None without a distance or without a face."""
        distance = self.distance
        return None if distance is None or self.threshold is None else distance < self.threshold

    @property
    def box(self) -> Box | None:
        best = self.best
        return None if best is None else tuple(float(v) for v in self.faces.boxes[best])


def score_photo(backend: FaceBackend, rgb: np.ndarray, reference: Reference, image: int = 0) -> ImageScore:
    """Detect and embed every face of one RGB uint8 photo and compare each with the reference."""
    if reference.embedding_space != backend.embedding_space:
        raise IDFuseInputError(f"The reference is in {reference.embedding_space}, {backend.name} embeds in "
                               f"{backend.embedding_space}; score with the backend that made the reference.")
    faces = backend.detect(rgb)
    # A DistanceBackend's raw descriptor is its embedding before scaling: one recogniser run gives both.
    vector_of = backend.descriptor if isinstance(backend, DistanceBackend) else backend.embed
    vectors = []
    for index in range(len(faces)):
        face = faces[index]
        if face.keypoints is None:
            raise FaceAnalysisError(f"{backend.name} found a face without its five keypoints, which embedding "
                                    f"needs; connect IDFuse Load Face Analysis.")
        vectors.append(np.asarray(vector_of(rgb, face), dtype=np.float32).reshape(-1))
    stacked = np.stack(vectors) if vectors else np.zeros((0, reference.direction.shape[0]), dtype=np.float32)
    distances = None
    if reference.centre is not None:
        distances = euclidean_distances(stacked if reference.raw else _unit(stacked), reference.centre)
    return ImageScore(image, rgb.shape[1], rgb.shape[0], faces, cosine_similarities(stacked, reference),
                      distances, reference.threshold)


def best_first(scores: Sequence[ImageScore]) -> list[int]:
    """Positions of the scores, highest similarity first; images without a face last; ties keep batch order."""
    return sorted(range(len(scores)), key=lambda i: (not scores[i].found, -scores[i].similarity, i))


@dataclass(frozen=True)
class BatchScores:
    """The scores of an IMAGE batch and what the node outputs from them."""

    scores: list[ImageScore]  # in batch order
    order: list[int]  # batch positions, best first
    reference: Reference
    backend_name: str

    def table(self) -> str:
        return score_table(self.scores, self.order, self.reference, self.backend_name)


def score_images(backend: FaceBackend, images: torch.Tensor, reference: Reference) -> tuple[BatchScores,
                                                                                          list[np.ndarray]]:
    """Score every image of a ComfyUI IMAGE batch; also returns the RGB uint8 photos (for the previews)."""
    photos = rgb_photos(images, "images")
    scores = [score_photo(backend, rgb, reference, index) for index, rgb in enumerate(photos)]
    batch = BatchScores(scores, best_first(scores), reference, backend.name)
    for score in scores:
        log.debug("Identity score: image %d: %d face(s), similarity %.4f", score.image + 1, len(score.faces),
                  score.similarity)
    return batch, photos


def _box_text(box: Box | None) -> str:
    return "" if box is None else "(" + ", ".join(f"{v:.0f}" for v in box) + ")"


def score_table(scores: Sequence[ImageScore], order: Sequence[int], reference: Reference, backend_name: str) -> str:
    """A plain-text table, best first: rank, image (1-based batch position), faces found, similarity, and in
    spaces with a threshold the distance and whether it is the same person; the best face's box."""
    threshold = reference.threshold
    header = f"Identity score: {backend_name} ({reference.embedding_space}) against {reference.description}; "
    header += "cosine similarity, higher is closer (1 = same vector)"
    if threshold is not None:
        header += f"; {reference.distance_note}"
    columns = ["rank", "image", "faces", "similarity"]
    if threshold is not None:
        columns += ["distance", "same person"]
    columns.append("box (x1, y1, x2, y2)")
    rows = []
    for rank, position in enumerate(order, start=1):
        score = scores[position]
        row = [str(rank), str(score.image + 1), str(len(score.faces))]
        if score.found:
            row.append(f"{score.similarity:.4f}")
            if threshold is not None:
                row += [f"{score.distance:.4f}", "yes" if score.same_person else "no"]
            row.append(_box_text(score.box))
        else:
            row += [NO_FACE] + (["-", "-"] if threshold is not None else []) + ["-"]
        rows.append(row)
    widths = [max(len(columns[i]), *(len(row[i]) for row in rows)) for i in range(len(columns))]
    lines = [header, "  ".join(name.ljust(width) for name, width in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def score_label(score: ImageScore, face: int) -> str:
    """The text written on a face in the preview: its similarity, and its distance where the space has one."""
    text = f"{score.similarities[face]:.2f}"
    if score.distances is not None:
        text += f" d {score.distances[face]:.2f}"
    return text


def draw_scores(rgb: np.ndarray, score: ImageScore) -> np.ndarray:
    """The photo with every face boxed (the best match green, the others amber, as Face Embed's preview) and its
    score written above the box; "no face" in red on a photo without one."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(draw_faces(rgb, score.faces, score.best))
    draw = ImageDraw.Draw(picture)
    side = max(rgb.shape[:2])
    font = label_font(max(10, round(side / 28)))
    if not score.found:
        draw.text((4, 4), NO_FACE, fill=NO_FACE_COLOUR, font=font)
    for index in range(len(score.faces)):
        x1, y1, _x2, _y2 = (float(v) for v in score.faces.boxes[index])
        text = score_label(score, index)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        y = y1 - (bottom - top) - 4 if y1 - (bottom - top) - 4 >= 0 else y1 + 2
        x = min(max(x1, 0.0), max(rgb.shape[1] - (right - left), 0))
        draw.rectangle([x, y, x + (right - left) + 2, y + (bottom - top) + 2], fill=(0, 0, 0))
        draw.text((x + 1 - left, y + 1 - top), text, font=font,
                  fill=CHOSEN_COLOUR if index == score.best else OTHER_COLOUR)
    return np.array(picture, dtype=np.uint8)


def score_previews(photos: Sequence[np.ndarray], batch: BatchScores, order: Sequence[int]) -> torch.Tensor:
    """The previews of the photos in the given order, as a ComfyUI IMAGE batch."""
    drawn = [torch.from_numpy(draw_scores(photos[i], batch.scores[i])) for i in order]
    return torch.stack(drawn).float() / 255.0
