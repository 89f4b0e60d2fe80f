"""What a face backend is, and the face data that passes between backends, nodes and encoders.

Two protocols, so that a backend which only finds faces fits as cleanly as one that also embeds them:

- ``FaceDetector``: a ``name`` and ``detect(rgb) -> DetectedFaces``. Enough for face masks (a plain box
  detector would do).
- ``FaceBackend``: a FaceDetector whose detections always carry the five keypoints, plus
  ``align(rgb, keypoints, size)``, ``embed(rgb, face)`` and the ``embedding_space`` its vectors
  live in. IDFuse Face Embed needs one; IDFuse Load Face Analysis makes one (socket FACE_ANALYSIS).

Landmarks come with detection: the same network (insightface's SCRFD) or step finds them, and every
consumer wants them for the faces just found, so ``DetectedFaces.keypoints`` holds them, [F, 5, 2]
in ``KEYPOINT_NAMES`` order (a backend whose landmark model gives more points reduces them to these
five), or ``None`` from a detector that finds no landmarks.

Photos are RGB uint8 numpy arrays [H, W, 3] (images.py makes them from ComfyUI IMAGEs); every
coordinate is in the photo's own pixels.

Backends that IDFuse Load Face Analysis can load subclass ``FaceBackendBase`` (the class-level
loading API) and are listed once in ``faces/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels

# The embedding spaces IDFuse knows: vectors are comparable only within one space (another recogniser, even
# of the same width, places faces elsewhere), and an ID encoder works only on the space it was trained on.
ARCFACE_W600K_512 = "arcface-w600k-512"
ARCFACE_GLINTR100_512 = "arcface-glintr100-512"
DLIB_RESNET_128 = "dlib-resnet-128"


@dataclass(frozen=True)
class EmbeddingSpace:
    """A face recogniser's embedding space: its vectors' width, what makes it, and how to get it in IDFuse."""

    name: str
    width: int
    description: str
    how_to_load: str  # a sentence: what to load to get embeddings of this space, for error messages


EMBEDDING_SPACES: dict[str, EmbeddingSpace] = {space.name: space for space in (
    EmbeddingSpace(ARCFACE_W600K_512, 512, "insightface buffalo_l's ArcFace recogniser w600k_r50 (what IP-Adapter "
                   "FaceID, FaceID-Plus and FaceID-PlusV2 were trained on)",
                   "Load buffalo_l in IDFuse Load Face Analysis"),
    EmbeddingSpace(ARCFACE_GLINTR100_512, 512, "insightface antelopev2's ArcFace recogniser glintr100 (InstantID, "
                   "PuLID)", "Load antelopev2 in IDFuse Load Face Analysis"),
    EmbeddingSpace(DLIB_RESNET_128, 128, "dlib's face recognition ResNet", "Load the dlib model in IDFuse Load "
                   "Face Analysis"),
)}


def describe_embedding_space(name: str) -> str:
    """'name (what makes it)' for messages; an unknown name as it is."""
    space = EMBEDDING_SPACES.get(name)
    return f"{name} ({space.description})" if space else name

KEYPOINT_NAMES = ("left eye", "right eye", "nose tip", "left mouth corner", "right mouth corner")


@dataclass(frozen=True)
class Face:
    """One detected face."""

    box: np.ndarray  # [4] x1, y1, x2, y2
    score: float
    keypoints: np.ndarray | None  # [5, 2] in KEYPOINT_NAMES order; None from a detector without landmarks


@dataclass(frozen=True)
class DetectedFaces:
    """Faces found in one photo, ordered left to right (by box centre), in the photo's pixels."""

    boxes: np.ndarray  # [F, 4] x1, y1, x2, y2
    scores: np.ndarray  # [F]
    keypoints: np.ndarray | None  # [F, 5, 2], or None from a detector without landmarks
    det_size: tuple[int, int] | None = None  # (width, height) the detector found them at; None if none or n/a
    searched: str = ""  # how the detector searched, for messages (e.g. "detection sizes tried: 640, 512")

    @classmethod
    def left_to_right(cls, boxes: np.ndarray, scores: np.ndarray, keypoints: np.ndarray | None,
                      det_size: tuple[int, int] | None = None, searched: str = "") -> DetectedFaces:
        """Faces in the order users count them (face_index), whatever order the detector gave."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        order = np.argsort((boxes[:, 0] + boxes[:, 2]) / 2, kind="stable")
        points = None if keypoints is None else np.asarray(keypoints, dtype=np.float32)[order]
        return cls(boxes[order], np.asarray(scores, dtype=np.float32)[order], points,
                   det_size if len(boxes) else None, searched)

    @classmethod
    def none_found(cls, searched: str = "", with_keypoints: bool = True) -> DetectedFaces:
        empty = np.zeros((0,), dtype=np.float32)
        return cls(empty.reshape(0, 4), empty, empty.reshape(0, 5, 2) if with_keypoints else None, None, searched)

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> Face:
        points = None if self.keypoints is None else self.keypoints[index]
        return Face(self.boxes[index], float(self.scores[index]), points)

    @property
    def areas(self) -> np.ndarray:
        return (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])

    def largest(self) -> int | None:
        """Index of the face with the largest box; None when there is none."""
        return int(np.argmax(self.areas)) if len(self) else None

    def largest_box(self) -> Box | None:
        index = self.largest()
        return None if index is None else tuple(float(v) for v in self.boxes[index])


@runtime_checkable
class FaceDetector(Protocol):
    """Finds faces in a photo."""

    name: str  # for messages and logs, e.g. "insightface buffalo_l"

    def detect(self, rgb: np.ndarray) -> DetectedFaces:
        """Every face in an RGB uint8 photo [H, W, 3]; a photo without one gives an empty result, never an error."""
        ...


@runtime_checkable
class FaceBackend(FaceDetector, Protocol):
    """Finds, aligns and embeds faces. Its detections always carry the five keypoints."""

    embedding_space: str  # what its vectors are comparable with: a name of EMBEDDING_SPACES where known

    def align(self, rgb: np.ndarray, keypoints: np.ndarray, size: int) -> np.ndarray:
        """The face aligned by its five keypoints [5, 2]: an RGB uint8 crop [size, size, 3]."""
        ...

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """The identity vector (float32, unit length) of one face detected in rgb."""
        ...


class FaceBackendBase(ABC):
    """A kind of face backend that IDFuse Load Face Analysis can load: its model names, where their files
    live and how to load one. Instances implement ``FaceBackend``. One file per kind; the list is in
    ``faces/__init__.py``."""

    model_folder: ClassVar[str]  # the ComfyUI model folder (folder_paths name) whose paths are searched

    @classmethod
    @abstractmethod
    def model_names(cls) -> tuple[str, ...]:
        """The model_name choices this kind offers."""

    @classmethod
    def providers(cls) -> list[str]:
        """Labels of the execution providers it can run on here."""
        return ["CPU"]

    @classmethod
    @abstractmethod
    def load(cls, model_name: str, model_roots: Sequence[str | Path], provider: str, det_size: int) -> FaceBackend:
        """The backend for model_name, its files looked up under model_roots; nothing is downloaded."""

    @classmethod
    def wrap(cls, value: object) -> FaceBackend | None:
        """This kind's backend around its library's own model object (made by a script or another pack);
        None when value is not one."""
        return None

    @classmethod
    def missing_dependencies(cls) -> str | None:
        """What to install for this kind to run, or None when it can run here."""
        return None


@dataclass(frozen=True)
class FaceSource:
    """Where one embedded face came from."""

    photo: int  # 1-based position in the image batch
    width: int
    height: int
    face: int  # index of the face among those found, left to right
    faces_found: int
    det_size: tuple[int, int] | None
    score: float

    def __str__(self) -> str:
        found = f"photo {self.photo} ({self.width}x{self.height}): face {self.face} of {self.faces_found}"
        return found if self.det_size is None else f"{found}, detection size {self.det_size[0]}"


@dataclass
class FaceEmbedding:
    """The identity of the face(s) in the reference photos (socket type ID_EMBEDS)."""

    arcface: torch.Tensor  # [1, D] the backend's unit-length embedding (ArcFace: D = 512), combined over photos
    clip_hidden: torch.Tensor | None  # [1, 257, 1280] CLIP vision penultimate hidden states of the 224 crops (mean)
    per_photo_arcface: torch.Tensor  # [N, D] one unit-length embedding per photo used
    boxes: torch.Tensor  # [N, 4] x1, y1, x2, y2 of the face used, in its photo's pixels
    keypoints: torch.Tensor  # [N, 5, 2] its five keypoints
    embedding_space: str  # the backend's FaceBackend.embedding_space: which encoders these vectors suit
    sources: tuple[FaceSource, ...] = field(default_factory=tuple)
    combine: str = "normalized mean"
    # [1, 257, 1280] the same CLIP vision model's penultimate hidden states of the unconditional image (the
    # negative of encoders with a CLIP mapper: embed.unconditional_clip_image); None without CLIP.
    clip_hidden_uncond: torch.Tensor | None = None
    backend: str = ""  # the backend's name, e.g. "insightface buffalo_l", for messages

    @property
    def num_photos(self) -> int:
        return self.per_photo_arcface.shape[0]
