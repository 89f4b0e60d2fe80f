"""Faces for the Infinite-ID encoder: find, align and embed the face in reference photos.

Plain python / numpy / torch; no ComfyUI imports (nodes/face.py is the glue).

insightface and onnxruntime are optional dependencies of the pack: they are imported inside the
functions that need them, so importing this module (and the pack) works without them, and the
face nodes then raise an error that says what to install. insightface never downloads anything
here: the model files are looked up first and a missing pack is an error naming the folder and
the files it needs (insightface's FaceAnalysis would otherwise try to download them).

Works with insightface 0.7.3 and 2.x: only the API both share is used (FaceAnalysis,
``det_model.detect(img, input_size=..., max_num=0)``, the ``"recognition"`` model's ``get``,
``app.common.Face`` and ``utils.face_align.norm_crop``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FaceAnalysisError, NoFaceError

log = logging.getLogger(__name__)

INSTALL_COMMAND = "pip install insightface onnxruntime"
INSTALL_HINT = (f"Install them into the Python that runs ComfyUI: `{INSTALL_COMMAND}` (for NVIDIA GPUs use "
                f"`onnxruntime-gpu` instead of `onnxruntime`; install exactly one of the two, never both), then "
                f"restart ComfyUI. The face models go into ComfyUI/models/insightface/models/<antelopev2 or "
                f"buffalo_l>/.")
MODEL_ZOO = "insightface's model zoo (https://github.com/deepinsight/insightface/tree/master/python-package)"


@dataclass(frozen=True)
class ModelPack:
    name: str
    detector: str  # SCRFD face detector with 5 keypoints
    recognizer: str  # ArcFace recognition model (512-d embedding)
    archive_files: tuple[str, ...]  # all that the archive holds; only the two above are used

    @property
    def required(self) -> tuple[str, str]:
        return (self.detector, self.recognizer)


MODEL_PACKS: dict[str, ModelPack] = {
    "antelopev2": ModelPack("antelopev2", "scrfd_10g_bnkps.onnx", "glintr100.onnx",
                            ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx",
                             "scrfd_10g_bnkps.onnx")),
    "buffalo_l": ModelPack("buffalo_l", "det_10g.onnx", "w600k_r50.onnx",
                           ("1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx", "w600k_r50.onnx")),
}

# UI label -> onnxruntime execution provider. Offered only where onnxruntime lists them.
PROVIDERS: dict[str, str] = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider"}

DEFAULT_DET_SIZE = 640
# When nothing is found at the requested detection size, these smaller ones are tried in turn:
# a face that fills the photo is too big for the detector's anchors at 640 but fits at 256.
FALLBACK_DET_SIZES = (640, 512, 384, 256, 160)
# Photos whose longer side is below this are padded (black, centred) to twice their size before
# detection: a tight face crop gives the detector no context and is upscaled past its anchors.
SMALL_IMAGE_SIDE = 256
ARCFACE_SIZE = 112
CLIP_CROP_SIZE = 224

FACE_CHOICES = ("largest", "index")
COMBINE_MODES = ("normalized mean", "mean")
NO_FACE_ACTIONS = ("error", "skip")

# Maps aligned face crops, float [K, 224, 224, 3] RGB in 0..1, to CLIP hidden states [K, T, C].
ClipEncoder = Callable[[torch.Tensor], torch.Tensor]


# --- dependencies and model files ----------------------------------------------------------


def import_insightface() -> Any:
    """The insightface package, or an error saying what to install."""
    try:
        import insightface
        import insightface.app  # noqa: F401  (FaceAnalysis)
        import insightface.utils.face_align  # noqa: F401
    except ImportError as error:
        raise FaceAnalysisError(f"The IDFuse face nodes need insightface and onnxruntime, which cannot be "
                                f"imported ({error}). {INSTALL_HINT}") from error
    return insightface


def available_providers(runtime_providers: Sequence[str] | None = None) -> list[str]:
    """UI labels of the execution providers the installed onnxruntime can run; CPU always."""
    if runtime_providers is None:
        try:
            import onnxruntime

            runtime_providers = onnxruntime.get_available_providers()
        except Exception as error:  # not installed, or a broken install (e.g. both CPU and GPU packages)
            log.debug("onnxruntime unavailable (%s); offering CPU only", error)
            runtime_providers = []
    return ["CPU"] + [label for label, name in PROVIDERS.items() if label != "CPU" and name in runtime_providers]


def find_model_pack(pack: str, insightface_roots: Sequence[str | Path]) -> Path:
    """The folder holding the pack's detector and recogniser.

    Looks in every insightface root (ComfyUI's models/insightface and the paths listed under
    ``insightface`` in extra_model_paths.yaml) for ``models/<pack>``, and for ``models/<pack>/<pack>``
    where the archive was unpacked into a folder of its own name.
    """
    spec = MODEL_PACKS.get(pack)
    if spec is None:
        raise FaceAnalysisError(f"Unknown insightface model pack '{pack}'; use one of {', '.join(MODEL_PACKS)}.")
    searched: list[Path] = []
    incomplete: list[tuple[Path, list[str]]] = []
    for root in insightface_roots:
        outer = Path(root) / "models" / pack
        for folder in (outer, outer / pack):
            searched.append(folder)
            if not folder.is_dir():
                continue
            missing = [name for name in spec.required if not (folder / name).is_file()]
            if not missing:
                return folder
            if any(folder.glob("*.onnx")):
                incomplete.append((folder, missing))
    where = "; ".join(str(folder) for folder in searched) or "(no insightface model folder is registered)"
    detail = "".join(f" {folder} lacks {', '.join(missing)}." for folder, missing in incomplete)
    first = searched[0] if searched else Path("ComfyUI/models/insightface/models") / pack
    raise FaceAnalysisError(
        f"insightface model pack '{pack}' not found.{detail} Put {spec.detector} and {spec.recognizer} "
        f"(from {pack}.zip of {MODEL_ZOO}; the archive also holds {', '.join(sorted(set(spec.archive_files) - set(spec.required)))}, "
        f"which are not needed) into {first}. Searched: {where}.")


def provider_chain(provider: str, runtime_providers: Sequence[str] | None = None) -> list[str]:
    available = available_providers(runtime_providers)
    if provider not in available:
        raise FaceAnalysisError(
            f"Execution provider '{provider}' is not available in the installed onnxruntime (available: "
            f"{', '.join(available)}). For CUDA install onnxruntime-gpu instead of onnxruntime (not both), or choose CPU.")
    chain = [PROVIDERS[provider]]
    if provider != "CPU":
        chain.append(PROVIDERS["CPU"])  # what onnxruntime runs the ops the GPU provider lacks on
    return chain


def load_face_analysis(pack: str, insightface_roots: Sequence[str | Path], provider: str = "CPU",
                       det_size: int = DEFAULT_DET_SIZE) -> Any:
    """An insightface FaceAnalysis with the pack's detector and recogniser, prepared for det_size."""
    if det_size < 32 or det_size % 32:
        raise FaceAnalysisError(f"Detection size {det_size} must be a positive multiple of 32 (e.g. 640).")
    insightface = import_insightface()  # first: without it nothing else matters
    folder = find_model_pack(pack, insightface_roots)
    providers = provider_chain(provider)
    try:
        # An absolute, existing folder as `name`: insightface then uses it as is and never downloads.
        analysis = insightface.app.FaceAnalysis(name=str(folder), root=str(folder.parent),
                                                allowed_modules=["detection", "recognition"], providers=providers)
        analysis.prepare(ctx_id=-1 if provider == "CPU" else 0, det_size=(det_size, det_size))
    except AssertionError as error:  # insightface asserts that a detector was found
        raise FaceAnalysisError(f"insightface recognised no face detector in {folder}; the .onnx files may be "
                                f"damaged. Download {pack}.zip again from {MODEL_ZOO}.") from error
    except Exception as error:
        raise FaceAnalysisError(f"insightface could not load the models in {folder}: {error}. Check the files "
                                f"(download {pack}.zip again from {MODEL_ZOO}) and the onnxruntime install.") from error
    if "recognition" not in analysis.models:
        raise FaceAnalysisError(f"insightface recognised no face recognition model in {folder}; expected "
                                f"{MODEL_PACKS[pack].recognizer}. Download {pack}.zip again from {MODEL_ZOO}.")
    active = analysis.det_model.session.get_providers()
    if providers[0] not in active:
        log.warning("%s was requested for the face models but onnxruntime runs them on %s (are the CUDA and "
                    "cuDNN libraries onnxruntime-gpu needs installed?)", provider, ", ".join(active))
    log.info("Loaded insightface %s from %s (%s, detection size %d)", pack, folder, provider, det_size)
    return analysis


# --- images ----------------------------------------------------------------------------------


def image_to_rgb(image: torch.Tensor) -> np.ndarray:
    """One ComfyUI image [H, W, C] in 0..1 (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA) -> uint8 RGB [H, W, 3].

    Alpha is composited over black, the colour the detector pads with.
    """
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise FaceAnalysisError(f"Expected an image [height, width, 1-4 channels], got shape {tuple(image.shape)}.")
    pixels = image.detach().to("cpu", torch.float32).clamp(0.0, 1.0)
    channels = pixels.shape[-1]
    colour = pixels[..., : 3 if channels >= 3 else 1]
    if channels in (2, 4):
        colour = colour * pixels[..., -1:]
    if colour.shape[-1] == 1:
        colour = colour.expand(-1, -1, 3)
    return (colour * 255.0).round().to(torch.uint8).numpy()


def pad_small_image(rgb: np.ndarray, min_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Centre a small photo on a black square twice its longer side; returns (image, (x, y) offset)."""
    min_side = SMALL_IMAGE_SIDE if min_side is None else min_side
    height, width = rgb.shape[:2]
    if max(height, width) >= min_side:
        return rgb, (0, 0)
    side = 2 * max(height, width)
    x, y = (side - width) // 2, (side - height) // 2
    canvas = np.zeros((side, side, 3), dtype=rgb.dtype)
    canvas[y:y + height, x:x + width] = rgb
    return canvas, (x, y)


# --- detection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedFaces:
    """Faces found in one photo, ordered left to right (by box centre), in the photo's pixels."""

    boxes: np.ndarray  # [F, 4] x1, y1, x2, y2
    scores: np.ndarray  # [F]
    keypoints: np.ndarray  # [F, 5, 2] eyes, nose tip, mouth corners
    det_size: tuple[int, int] | None  # (width, height) at which they were found; None if none were

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def areas(self) -> np.ndarray:
        return (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])


def _size_pair(value: Any) -> tuple[int, int] | None:
    try:
        width, height = (int(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 else None


def detection_sizes(analysis: Any) -> list[tuple[int, int]]:
    """The prepared detection size, then the smaller fallback sizes; only the model's own for a fixed-size detector."""
    shape = getattr(analysis.det_model, "input_shape", None)
    if shape is not None and len(shape) == 4 and all(isinstance(v, int) for v in shape[2:4]):
        return [(int(shape[3]), int(shape[2]))]
    prepared = getattr(analysis, "det_size", None)
    start = _size_pair(prepared)
    if start is None and isinstance(prepared, (list, tuple)) and prepared:  # insightface 2 accepts a list of sizes
        start = max((p for p in map(_size_pair, prepared) if p), default=None, key=lambda p: p[0] * p[1])
    start = start or (DEFAULT_DET_SIZE, DEFAULT_DET_SIZE)
    return [start] + [(s, s) for s in FALLBACK_DET_SIZES if s * s < start[0] * start[1]]


def detect_faces(analysis: Any, rgb: np.ndarray, sizes: Sequence[tuple[int, int]]) -> DetectedFaces:
    """Detect at each size in turn until faces are found; small photos are padded first."""
    padded, (dx, dy) = pad_small_image(rgb)
    bgr = np.ascontiguousarray(padded[:, :, ::-1])  # insightface works on OpenCV's BGR
    for size in sizes:
        found, keypoints = analysis.det_model.detect(bgr, input_size=size, max_num=0)
        if len(found) == 0:
            continue
        if keypoints is None:
            raise FaceAnalysisError("The face detector gives no keypoints, which alignment needs; use the "
                                    "detector of antelopev2 or buffalo_l.")
        offset = np.array([dx, dy], dtype=np.float32)
        boxes = found[:, :4].astype(np.float32) - np.tile(offset, 2)
        keypoints = keypoints.astype(np.float32) - offset
        order = np.argsort((boxes[:, 0] + boxes[:, 2]) / 2, kind="stable")
        return DetectedFaces(boxes[order], found[order, 4].astype(np.float32), keypoints[order], tuple(size))
    empty = np.zeros((0,), dtype=np.float32)
    return DetectedFaces(empty.reshape(0, 4), empty, empty.reshape(0, 5, 2), None)


def choose_face(faces: DetectedFaces, face_choice: str, face_index: int, photo: str) -> int:
    if face_choice == "largest":
        return int(np.argmax(faces.areas))
    if face_choice == "index":
        if not 0 <= face_index < len(faces):
            raise FaceAnalysisError(f"{photo} has {len(faces)} face(s) (indices 0 to {len(faces) - 1}, left to "
                                    f"right), so face_index {face_index} does not exist. Lower face_index or "
                                    f"use face_choice 'largest'.")
        return face_index
    raise FaceAnalysisError(f"Unknown face_choice '{face_choice}'; use one of {', '.join(FACE_CHOICES)}.")


# --- alignment and embeddings ----------------------------------------------------------------


@contextlib.contextmanager
def _quiet_alignment():
    # scikit-image >= 0.26 deprecates SimilarityTransform.estimate, which face_align calls on every crop.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*estimate.*deprecated", category=FutureWarning)
        yield


def aligned_crop(rgb: np.ndarray, keypoints: np.ndarray, size: int) -> np.ndarray:
    """insightface's ArcFace alignment (similarity transform of the 5 keypoints), size x size RGB uint8."""
    from insightface.utils import face_align

    with _quiet_alignment():
        return face_align.norm_crop(rgb, landmark=keypoints, image_size=size)


def arcface_embedding(analysis: Any, rgb: np.ndarray, box: np.ndarray, keypoints: np.ndarray,
                      score: float) -> np.ndarray:
    """insightface's normed_embedding of one face, through its own recognition model (aligns at 112)."""
    from insightface.app.common import Face

    recognizer = analysis.models.get("recognition")
    if recognizer is None:
        raise FaceAnalysisError("The face analysis has no recognition model; load antelopev2 or buffalo_l with "
                                "IDFuse Load Face Analysis.")
    face = Face(bbox=box, kps=keypoints, det_score=score)
    with _quiet_alignment():
        recognizer.get(np.ascontiguousarray(rgb[:, :, ::-1]), face)
    return np.asarray(face.normed_embedding, dtype=np.float32)


@dataclass(frozen=True)
class FaceSource:
    """Where one embedded face came from."""

    photo: int  # 1-based position in the image batch
    width: int
    height: int
    face: int  # index of the face among those found, left to right
    faces_found: int
    det_size: tuple[int, int]
    score: float

    def __str__(self) -> str:
        return (f"photo {self.photo} ({self.width}x{self.height}): face {self.face} of {self.faces_found}, "
                f"detection size {self.det_size[0]}")


@dataclass
class FaceEmbedding:
    """The identity of the face(s) in the reference photos (socket type ID_EMBEDS)."""

    arcface: torch.Tensor  # [1, 512] insightface normed_embedding, combined over photos
    clip_hidden: torch.Tensor | None  # [1, 257, 1280] CLIP vision penultimate hidden states of the 224 crops (mean)
    per_photo_arcface: torch.Tensor  # [N, 512] one normed embedding per photo used
    boxes: torch.Tensor  # [N, 4] x1, y1, x2, y2 of the face used, in its photo's pixels
    keypoints: torch.Tensor  # [N, 5, 2] its five keypoints
    sources: tuple[FaceSource, ...] = field(default_factory=tuple)
    combine: str = "normalized mean"

    @property
    def num_photos(self) -> int:
        return self.per_photo_arcface.shape[0]


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


def embed_faces(analysis: Any, images: torch.Tensor, face_choice: str = "largest", face_index: int = 0,
                combine: str = "normalized mean", on_no_face: str = "error",
                clip_encoder: ClipEncoder | None = None) -> tuple[FaceEmbedding, torch.Tensor]:
    """The ID embedding of the face in each photo of a ComfyUI IMAGE batch, and a preview batch.

    Each photo: detect (falling back to smaller detection sizes), choose a face, ArcFace-embed it
    with insightface's recognition model and, with a CLIP encoder, encode its aligned 224 crop.
    Photos without a face are an error naming them, or with on_no_face='skip' are left out.
    """
    if on_no_face not in NO_FACE_ACTIONS:
        raise FaceAnalysisError(f"Unknown on_no_face '{on_no_face}'; use one of {', '.join(NO_FACE_ACTIONS)}.")
    if combine not in COMBINE_MODES:
        raise FaceAnalysisError(f"Unknown combine mode '{combine}'; use one of {', '.join(COMBINE_MODES)}.")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise FaceAnalysisError(f"Expected an IMAGE batch [photos, height, width, channels], got shape "
                                f"{tuple(images.shape)}.")
    import_insightface()
    if not (hasattr(analysis, "det_model") and isinstance(getattr(analysis, "models", None), dict)):
        raise FaceAnalysisError(f"face_analysis is a {type(analysis).__name__}, not insightface's FaceAnalysis; "
                                f"connect IDFuse Load Face Analysis.")
    photos = [image_to_rgb(image) for image in images]
    sizes = detection_sizes(analysis)
    detections = [detect_faces(analysis, rgb, sizes) for rgb in photos]
    count = len(photos)

    missing = [i for i, faces in enumerate(detections) if len(faces) == 0]
    tried = ", ".join(str(w) if w == h else f"{w}x{h}" for w, h in sizes)
    if missing and (on_no_face == "error" or len(missing) == count):
        names = ", ".join(_photo_label(i, count, photos[i]) for i in missing)
        advice = "Use photos where the face is clearly visible and not tiny"
        advice += (", or set on_no_face to 'skip' to leave those photos out." if len(missing) < count else ".")
        raise NoFaceError(f"No face found in {names} (detection sizes tried: {tried}). {advice}")
    for i in missing:
        log.warning("No face in %s; skipped (on_no_face = skip)", _photo_label(i, count, photos[i]))

    chosen: dict[int, int] = {}
    embeddings, boxes, keypoints, sources, crops = [], [], [], [], []
    for i, (rgb, faces) in enumerate(zip(photos, detections, strict=True)):
        if len(faces) == 0:
            continue
        pick = choose_face(faces, face_choice, face_index, _photo_label(i, count, rgb))
        chosen[i] = pick
        embeddings.append(arcface_embedding(analysis, rgb, faces.boxes[pick], faces.keypoints[pick],
                                            float(faces.scores[pick])))
        boxes.append(faces.boxes[pick])
        keypoints.append(faces.keypoints[pick])
        sources.append(FaceSource(photo=i + 1, width=rgb.shape[1], height=rgb.shape[0], face=pick,
                                  faces_found=len(faces), det_size=faces.det_size, score=float(faces.scores[pick])))
        if clip_encoder is not None:
            crops.append(aligned_crop(rgb, faces.keypoints[pick], CLIP_CROP_SIZE))
        log.info("Face embed: %s", sources[-1])

    per_photo = torch.from_numpy(np.stack(embeddings))
    clip_hidden = None
    if clip_encoder is not None:
        clip_hidden = encode_crops(clip_encoder, crops)
    embedding = FaceEmbedding(
        arcface=combine_embeddings(per_photo, combine), clip_hidden=clip_hidden, per_photo_arcface=per_photo,
        boxes=torch.from_numpy(np.stack(boxes)), keypoints=torch.from_numpy(np.stack(keypoints)),
        sources=tuple(sources), combine=combine)
    preview = torch.stack([torch.from_numpy(draw_faces(rgb, faces, chosen.get(i)))
                           for i, (rgb, faces) in enumerate(zip(photos, detections, strict=True))])
    return embedding, preview.float() / 255.0


def encode_crops(clip_encoder: ClipEncoder, crops: list[np.ndarray]) -> torch.Tensor:
    """Mean CLIP hidden states [1, T, C] of the aligned 224 crops (always a plain mean: they are features, not unit vectors)."""
    batch = torch.from_numpy(np.stack(crops)).float() / 255.0
    hidden = clip_encoder(batch)
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.shape[0] != len(crops):
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise FaceAnalysisError(f"The CLIP vision model returned {shape} for {len(crops)} face crops; expected "
                                f"hidden states [{len(crops)}, tokens, width]. Use a CLIP vision model "
                                f"(e.g. ViT-H/14) in the clip_vision input.")
    return hidden.detach().to("cpu", torch.float32).mean(dim=0, keepdim=True)


# --- preview ---------------------------------------------------------------------------------

_CHOSEN = (0, 220, 0)
_OTHER = (255, 200, 0)
_NO_FACE = (230, 0, 0)
# left eye, right eye, nose tip, left and right mouth corner
_KEYPOINT_COLOURS = ((0, 120, 255), (0, 120, 255), (255, 0, 0), (255, 0, 255), (255, 0, 255))


def draw_faces(rgb: np.ndarray, faces: DetectedFaces, chosen: int | None) -> np.ndarray:
    """The photo with every detected box (chosen face green, others amber, labelled with their index) and
    the five keypoints; a red frame where no face was found."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    line = max(1, round(max(rgb.shape[:2]) / 256))
    if len(faces) == 0:
        draw.rectangle([0, 0, rgb.shape[1] - 1, rgb.shape[0] - 1], outline=_NO_FACE, width=2 * line)
    for index, (box, points) in enumerate(zip(faces.boxes, faces.keypoints, strict=True)):
        colour = _CHOSEN if index == chosen else _OTHER
        draw.rectangle([float(v) for v in box], outline=colour, width=(2 if index == chosen else 1) * line)
        draw.text((float(box[0]) + 2 * line, float(box[1]) + line), str(index), fill=colour)
        radius = 1.5 * line
        for (x, y), point_colour in zip(points, _KEYPOINT_COLOURS, strict=True):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=point_colour)
    return np.array(picture, dtype=np.uint8)  # a writable copy, for torch.from_numpy
