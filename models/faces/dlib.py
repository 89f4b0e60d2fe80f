"""The dlib face backend: public-domain models that come with two pip packages, nothing to download or copy.

``pip install dlib-bin face-recognition-models`` (requirements.txt) brings dlib's wheels and, inside the
``face_recognition_models`` package, the model files this backend uses: the MMOD CNN face detector, the
5-point landmark model and the 128-d ResNet face recogniser (their author released them into the public
domain). The HOG frontal-face detector is built into dlib. The package's 68-point landmark model is *not*
free for commercial use and is never loaded. dlib is imported inside the functions that need it, so the
pack loads without it.

Two model names (``MODELS``): HOG (fast, frontal and near-frontal faces) and the CNN (also turned faces;
slow on CPU, dlib runs it on CUDA only in a CUDA build of dlib, which the dlib-bin wheels are not).

Detection: the photo is scaled so that its longer side is ``det_size`` (as insightface's detector sees its
square), then searched. The HOG detector also searches it at twice that size (one upsample, cheap), so it
finds faces down to about det_size / 16 pixels; the CNN searches it once, finding faces down to about
det_size / 8 (its time grows with det_size squared: raise det_size for small faces in group photos).

Keypoints: dlib's 5-point model gives the two corners of each eye and the bottom of the nose, not
insightface's five (``KEYPOINT_NAMES``). ``keypoints_from_dlib_points`` makes those: the eye centres are
the means of the corner pairs; the nose tip and the mouth corners are *estimated* from the ArcFace
template face, placed on the photo by the similarity transform that best maps the template's eyes and
nose bottom onto the measured ones. They are good enough for ``align`` (the CLIP face crops), not
measured landmarks.

Embedding: dlib's recogniser on dlib's own face chip (``get_face_chip`` of the 5-point shape, 150 px,
padding 0.25), which is what it was trained on, not on ``align``'s crop.

For the Identity Score node (and anything else that compares dlib faces):

- ``DlibBackend.embed(rgb, face)`` follows the FaceBackend protocol: the descriptor scaled to unit length
  (float32), comparable by cosine like ArcFace embeddings and stored in ID_EMBEDS.
- ``DlibBackend.descriptor(rgb, face)`` is dlib's raw 128-d descriptor. dlib's same-person rule is on raw
  descriptors: Euclidean distance below ``SAME_PERSON_DISTANCE`` (0.6) means the same person
  (``descriptor_distance``). Raw descriptors are NOT unit length (about 1.45 on the package photos), so
  the 0.6 threshold does not apply to unit vectors; ``unit_distance_threshold`` gives the approximately
  equivalent distance between unit vectors (0.6 / ``TYPICAL_DESCRIPTOR_NORM``) for references that are
  only known as unit vectors (ID_EMBEDS).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FaceAnalysisError
from .images import detection_canvas
from .types import DLIB_RESNET_128, DetectedFaces, Face, FaceBackendBase

log = logging.getLogger("idfuse.faces")

INSTALL_COMMAND = "pip install dlib-bin face-recognition-models"
INSTALL_HINT = (f"Install them into the Python that runs ComfyUI: `{INSTALL_COMMAND}` (both are in the pack's "
                f"requirements.txt), then restart ComfyUI.")
MODEL_PACKAGE = "face_recognition_models"  # ships the model files in its models/ folder

LANDMARK_MODEL = "shape_predictor_5_face_landmarks.dat"  # never the 68-point model: not free for commercial use
CNN_DETECTOR_MODEL = "mmod_human_face_detector.dat"
RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"

DEFAULT_DET_SIZE = 640
SAME_PERSON_DISTANCE = 0.6  # dlib's threshold on the Euclidean distance of raw descriptors
# Mean norm of the raw descriptors of the faces in the package photos (skimage's astronaut and its mirror
# image, insightface's Tom Hanks crop and the six faces of t1.jpg: 1.44 to 1.54); see unit_distance_threshold.
TYPICAL_DESCRIPTOR_NORM = 1.48
CHIP_SIZE = 150  # dlib's face chip the recogniser was trained on: 150 px, padding 0.25
CHIP_PADDING = 0.25
DESCRIPTOR_WIDTH = 128

# The ArcFace reference positions of KEYPOINT_NAMES in a 112 px crop (the alignment insightface's models and
# FaceID-Plus CLIP crops use), and where dlib's nose-bottom point falls in it (measured with dlib's 5-point
# model on insightface's Tom_Hanks_54745.png, which is such an aligned crop: (59, 84), x moved to the centre).
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
TEMPLATE_NOSE_BOTTOM_112 = np.array([56.0, 84.0])


@dataclass(frozen=True)
class DlibDetector:
    """One model name: which dlib detector and how many times it upsamples the det_size photo."""

    model_name: str
    kind: str  # "hog" or "cnn"
    upsamples: int
    # How much more of the face than the detector's box the face box shows (left, top, right, bottom, as shares
    # of the box's width and height): HOG's boxes stop at the brows and above the chin, while the pack's face
    # boxes (insightface's, the face masks drawn from them) span forehead to chin. Measured on scikit-image's
    # astronaut against its hand label (tests/faces/test_dlib_backend.py); the CNN's boxes already do.
    box_margins: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def face_box(self, rectangle: Sequence[float]) -> np.ndarray:
        """The detector's box (x1, y1, x2, y2) -> the face box."""
        x1, y1, x2, y2 = rectangle
        left, top, right, bottom = self.box_margins
        width, height = x2 - x1, y2 - y1
        return np.array([x1 - left * width, y1 - top * height, x2 + right * width, y2 + bottom * height])

    def detector_box(self, box: Sequence[float]) -> np.ndarray:
        """The face box -> the detector's box, which the landmark model was trained on (inverse of face_box)."""
        x1, y1, x2, y2 = (float(v) for v in box)
        left, top, right, bottom = self.box_margins
        width, height = (x2 - x1) / (1 + left + right), (y2 - y1) / (1 + top + bottom)
        return np.array([x1 + left * width, y1 + top * height, x2 - right * width, y2 - bottom * height])


HOG_MODEL = "dlib HOG (public domain, built in)"
CNN_MODEL = "dlib CNN (public domain, built in, slow on CPU)"
MODELS: dict[str, DlibDetector] = {detector.model_name: detector for detector in (
    DlibDetector(HOG_MODEL, "hog", 1, (0.05, 0.15, 0.05, 0.09)),  # fast on CPU: frontal and near-frontal faces
    DlibDetector(CNN_MODEL, "cnn", 0),  # MMOD CNN: also turned faces; seconds per photo on CPU
)}


# --- dependencies and model files ----------------------------------------------------------------


def import_dlib() -> Any:
    """The dlib module, or an error saying what to install."""
    try:
        import dlib
    except ImportError as error:
        raise FaceAnalysisError(f"The dlib face backend needs dlib, which cannot be imported ({error}). "
                                f"{INSTALL_HINT}") from error
    return dlib


def model_file(name: str) -> Path:
    """A model file of the face_recognition_models package.

    The package is located, not imported: its __init__ imports pkg_resources, which setuptools 81 and later
    no longer have, while its files are fine.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "models" / name
        if path.is_file():
            return path
    where = f" (looked in {', '.join(str(Path(f) / 'models') for f in folders)})" if folders else ""
    raise FaceAnalysisError(f"The dlib face backend needs {name} from the {MODEL_PACKAGE} package, which is "
                            f"not installed or incomplete{where}. {INSTALL_HINT}")


def available_providers() -> list[str]:
    """CPU, and CUDA where the installed dlib was built with it."""
    try:
        import dlib
    except ImportError:
        return ["CPU"]
    return ["CPU", "CUDA"] if getattr(dlib, "DLIB_USE_CUDA", False) else ["CPU"]


# --- geometry ------------------------------------------------------------------------------------


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, shift) that maps source points [N, 2] onto target points
    [N, 2] best in the least-squares sense (Umeyama's method)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    source_mean, target_mean = source.mean(0), target.mean(0)
    src, dst = source - source_mean, target - target_mean
    covariance = dst.T @ src / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection is not a similarity
        sign[-1] = -1
    rotation = u @ np.diag(sign) @ vt
    scale = (singular * sign).sum() / max((src ** 2).sum() / len(source), 1e-12)
    shift = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, shift[:, None]])


def apply_transform(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float64) @ transform[:, :2].T + transform[:, 2]


def keypoints_from_dlib_points(points: np.ndarray) -> np.ndarray:
    """dlib's five points [5, 2] (corners of the eye on the photo's right, of the eye on its left, nose bottom)
    -> the five keypoints [5, 2] in KEYPOINT_NAMES order (left eye on the photo's left, as insightface).

    The eye centres are measured (means of the corner pairs). The 5-point model has no nose tip and no
    mouth: those three are estimated from the ArcFace template face, fitted to the two eye centres and the
    nose bottom by a similarity transform.
    """
    points = np.asarray(points, np.float64)
    left_eye, right_eye = points[2:4].mean(0), points[0:2].mean(0)
    measured = np.stack([left_eye, right_eye, points[4]])
    template = np.stack([ARCFACE_TEMPLATE_112[0], ARCFACE_TEMPLATE_112[1], TEMPLATE_NOSE_BOTTOM_112])
    estimated = apply_transform(similarity_transform(template, measured), ARCFACE_TEMPLATE_112[2:])
    return np.vstack([left_eye, right_eye, estimated]).astype(np.float32)


def warp_affine(rgb: np.ndarray, transform: np.ndarray, size: int) -> np.ndarray:
    """The size x size crop whose pixel (x, y) is rgb at transform^-1 (x, y): bilinear, black outside."""
    inverse = np.linalg.inv(np.vstack([transform, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    source = np.stack([xs.ravel(), ys.ravel()], axis=1) @ inverse[:, :2].T + inverse[:, 2]
    height, width = rgb.shape[:2]
    # grid_sample's normalised coordinates, pixel centres (align_corners=True: -1 and 1 are the outer centres)
    grid = torch.from_numpy(np.stack([source[:, 0] / max(width - 1, 1), source[:, 1] / max(height - 1, 1)], -1))
    grid = (grid * 2 - 1).float().view(1, size, size, 2)
    pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    crop = torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return crop[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resized(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """The photo at width x height (antialiased when shrinking), uint8 RGB, C-contiguous as dlib needs."""
    if (width, height) == (rgb.shape[1], rgb.shape[0]):
        return np.ascontiguousarray(rgb)
    pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    scaled = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False,
                                             antialias=width < rgb.shape[1])
    return np.ascontiguousarray(scaled[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())


# --- the backend -----------------------------------------------------------------------------------


class DlibBackend(FaceBackendBase):
    """dlib's HOG or CNN face detector, 5-point landmarks and 128-d ResNet recogniser, as a types.FaceBackend.

    See the module docstring for the keypoints, the embedding (``embed`` unit length, ``descriptor`` raw)
    and dlib's 0.6 distance rule.
    """

    model_folder = ""  # the model files come with the face_recognition_models package, not a ComfyUI folder
    embedding_space = DLIB_RESNET_128
    same_person_distance = SAME_PERSON_DISTANCE

    def __init__(self, detector: DlibDetector = MODELS[HOG_MODEL],
                 det_size: int = DEFAULT_DET_SIZE, provider: str = "CPU"):
        if det_size < 32:
            raise FaceAnalysisError(f"Detection size {det_size} is too small for the dlib face detectors; use at "
                                    f"least 160 (640 suits most photos).")
        dlib = import_dlib()
        self.detector = detector
        self.det_size = int(det_size)
        self.provider = provider
        self.name = detector.model_name
        if detector.kind == "cnn":
            self._detect_model = dlib.cnn_face_detection_model_v1(str(model_file(CNN_DETECTOR_MODEL)))
        else:
            self._detect_model = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(model_file(LANDMARK_MODEL)))
        self._recognizer = dlib.face_recognition_model_v1(str(model_file(RECOGNITION_MODEL)))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} (detection size {self.det_size}, {self.embedding_space})>"

    # -- loading (FaceBackendBase) --

    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        return tuple(MODELS)

    @classmethod
    def providers(cls) -> list[str]:
        return available_providers()

    @classmethod
    def load(cls, model_name: str, model_roots: Sequence[str | Path] = (), provider: str = "CPU",
             det_size: int = DEFAULT_DET_SIZE) -> DlibBackend:
        """The backend for one of MODELS; model_roots are not used (the files come with a pip package)."""
        detector = MODELS.get(model_name)
        if detector is None:
            raise FaceAnalysisError(f"Unknown dlib face model '{model_name}'; use one of {', '.join(MODELS)}.")
        available = available_providers()
        if provider not in available:
            raise FaceAnalysisError(f"Provider '{provider}' is not available for dlib (available: "
                                    f"{', '.join(available)}): the installed dlib was built without CUDA (the "
                                    f"dlib-bin wheels are CPU-only; CUDA needs dlib built from source with "
                                    f"CUDA). Choose CPU.")
        if provider == "CPU" and "CUDA" in available:
            log.warning("This dlib was built with CUDA and runs its CNN detector and recogniser on the GPU "
                        "whichever provider is chosen")
        backend = cls(detector, det_size, provider)
        log.info("Loaded %s (%s, detection size %d)", model_name, provider, det_size)
        return backend

    @classmethod
    def missing_dependencies(cls) -> str | None:
        try:
            import_dlib()
            for name in (LANDMARK_MODEL, CNN_DETECTOR_MODEL, RECOGNITION_MODEL):
                model_file(name)
        except FaceAnalysisError as error:
            return str(error)
        return None

    # -- detection --

    def detection_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the detector sees a photo of this size at: the longer side scaled to det_size."""
        scale = self.det_size / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def detect(self, rgb: np.ndarray) -> DetectedFaces:
        """Every face, with dlib's score (HOG: SVM margin; CNN: confidence) and the five keypoints."""
        canvas, (dx, dy) = detection_canvas(np.asarray(rgb, dtype=np.uint8))
        size = self.detection_size(canvas.shape[1], canvas.shape[0])
        searched = (f"{self.detector.kind.upper()} detector at {size[0]}x{size[1]}"
                    f"{f', upsampled {self.detector.upsamples}x' if self.detector.upsamples else ''}")
        rectangles, scores = self._find(resized(canvas, *size))
        if not rectangles:
            return DetectedFaces.none_found(searched)
        scale = canvas.shape[1] / size[0]
        found = np.array(rectangles, dtype=np.float64) * scale - np.array([dx, dy, dx, dy])
        boxes = np.stack([self.detector.face_box(rectangle) for rectangle in found])
        photo = np.ascontiguousarray(rgb, dtype=np.uint8)
        keypoints = np.stack([keypoints_from_dlib_points(self._points(photo, box)) for box in boxes])
        return DetectedFaces.left_to_right(boxes, np.asarray(scores), keypoints, size, searched)

    def _find(self, rgb: np.ndarray) -> tuple[list[tuple[float, float, float, float]], list[float]]:
        """Boxes (x1, y1, x2, y2, in rgb's pixels) and scores of the faces the detector finds."""
        if self.detector.kind == "cnn":
            found = self._detect_model(rgb, self.detector.upsamples)
            return ([(d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1) for d in found],
                    [float(d.confidence) for d in found])
        found, scores, _ = self._detect_model.run(rgb, self.detector.upsamples, 0.0)
        return [(d.left(), d.top(), d.right() + 1, d.bottom() + 1) for d in found], [float(s) for s in scores]

    def _shape(self, rgb: np.ndarray, box: np.ndarray) -> Any:
        """dlib's 5-point shape of the face in the face box (x1, y1, x2, y2), on the full-resolution photo."""
        dlib = import_dlib()
        x1, y1, x2, y2 = (int(round(float(v))) for v in self.detector.detector_box(box))
        return self._landmarks(rgb, dlib.rectangle(x1, y1, max(x2 - 1, x1 + 1), max(y2 - 1, y1 + 1)))

    def _points(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        shape = self._shape(rgb, box)
        return np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float64)

    # -- alignment and embedding --

    def align(self, rgb: np.ndarray, keypoints: np.ndarray, size: int) -> np.ndarray:
        """The ArcFace alignment (similarity transform of the five keypoints onto the ArcFace template scaled to
        size), size x size RGB uint8: the crops FaceID-Plus CLIP features are made from."""
        transform = similarity_transform(keypoints, ARCFACE_TEMPLATE_112 * (size / 112.0))
        return warp_affine(np.asarray(rgb, dtype=np.uint8), transform, size)

    def face_chip(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """dlib's own aligned chip of the face (150 px, padding 0.25): what the recogniser sees."""
        dlib = import_dlib()
        photo = np.ascontiguousarray(rgb, dtype=np.uint8)
        return dlib.get_face_chip(photo, self._shape(photo, face.box), size=CHIP_SIZE, padding=CHIP_PADDING)

    def descriptor(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """dlib's raw 128-d descriptor (float32, not unit length) of one face detected in rgb: compare two with
        ``descriptor_distance`` and ``SAME_PERSON_DISTANCE``."""
        vector = self._recognizer.compute_face_descriptor(self.face_chip(rgb, face))
        return np.asarray(vector, dtype=np.float32)

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """The descriptor scaled to unit length (float32): the FaceBackend embedding, for cosine similarity."""
        vector = self.descriptor(rgb, face)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)


def descriptor_distance(first: np.ndarray, second: np.ndarray) -> float:
    """Euclidean distance of two raw dlib descriptors; below SAME_PERSON_DISTANCE (0.6): the same person."""
    return float(np.linalg.norm(np.asarray(first, np.float64) - np.asarray(second, np.float64)))


def unit_distance_threshold() -> float:
    """The distance between unit-length dlib embeddings that corresponds to dlib's 0.6 on raw descriptors (for
    typical descriptor norms): an approximation for references known only as unit vectors (ID_EMBEDS)."""
    return SAME_PERSON_DISTANCE / TYPICAL_DESCRIPTOR_NORM
