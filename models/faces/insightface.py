"""The insightface face backend: SCRFD detection with five keypoints, ArcFace alignment and embedding.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FaceAnalysisError
from .images import detection_canvas
from .types import ARCFACE_GLINTR100_512, ARCFACE_W600K_512, DetectedFaces, Face, FaceBackendBase

log = logging.getLogger("idfuse.faces")

INSTALL_COMMAND = "pip install insightface onnxruntime"
INSTALL_HINT = (f"Install them into the Python that runs ComfyUI: `{INSTALL_COMMAND}` (for NVIDIA GPUs use "
                f"`onnxruntime-gpu` instead of `onnxruntime`; install exactly one of the two, never both), then "
                f"restart ComfyUI. The face models go into ComfyUI/models/insightface/models/<buffalo_l or "
                f"antelopev2>/.")
MODEL_ZOO = "insightface's model zoo (https://github.com/deepinsight/insightface/tree/master/python-package)"
MODEL_FOLDER = "insightface"  # insightface's root: <root>/models/<pack>/*.onnx


@dataclass(frozen=True)
class ModelPack:
    name: str
    detector: str  # SCRFD face detector with 5 keypoints
    recognizer: str  # ArcFace recognition model (512-d embedding)
    embedding_space: str  # what its embeddings are comparable with (FaceBackend.embedding_space)
    archive_files: tuple[str, ...]  # all that the archive holds; only the two above are used

    @property
    def required(self) -> tuple[str, str]:
        return (self.detector, self.recognizer)


# buffalo_l first: IDFuse Load Face Analysis offers the packs in this order and ComfyUI preselects the first, and
# buffalo_l's w600k_r50 is the embedding space IP-Adapter FaceID / Plus / PlusV2 were trained on.
MODEL_PACKS: dict[str, ModelPack] = {
    "buffalo_l": ModelPack("buffalo_l", "det_10g.onnx", "w600k_r50.onnx", ARCFACE_W600K_512,
                           ("1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx", "w600k_r50.onnx")),
    "antelopev2": ModelPack("antelopev2", "scrfd_10g_bnkps.onnx", "glintr100.onnx", ARCFACE_GLINTR100_512,
                            ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx",
                             "scrfd_10g_bnkps.onnx")),
}
RECOMMENDED_PACK = "buffalo_l"

# UI label -> onnxruntime execution provider. Offered only where onnxruntime lists them.
PROVIDERS: dict[str, str] = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider"}

DEFAULT_DET_SIZE = 640
# When nothing is found at the requested detection size, these smaller ones are tried in turn:
# a face that fills the photo is too big for the detector's anchors at 640 but fits at 256.
FALLBACK_DET_SIZES = (640, 512, 384, 256, 160)


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
    unused = ", ".join(sorted(set(spec.archive_files) - set(spec.required)))
    raise FaceAnalysisError(
        f"insightface model pack '{pack}' not found.{detail} Put {spec.detector} and {spec.recognizer} "
        f"(from {pack}.zip of {MODEL_ZOO}; the archive also holds {unused}, which are not needed) into {first}. "
        f"Searched: {where}.")


def provider_chain(provider: str, runtime_providers: Sequence[str] | None = None) -> list[str]:
    available = available_providers(runtime_providers)
    if provider not in available:
        raise FaceAnalysisError(
            f"Execution provider '{provider}' is not available in the installed onnxruntime (available: "
            f"{', '.join(available)}). For CUDA install onnxruntime-gpu instead of onnxruntime (not both), or "
            f"choose CPU.")
    chain = [PROVIDERS[provider]]
    if provider != "CPU":
        chain.append(PROVIDERS["CPU"])  # what onnxruntime runs the ops the GPU provider lacks on
    return chain


def _size_pair(value: Any) -> tuple[int, int] | None:
    try:
        width, height = (int(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 else None


def _size_label(size: tuple[int, int]) -> str:
    width, height = size
    return str(width) if width == height else f"{width}x{height}"


@contextlib.contextmanager
def _quiet_alignment():
    # scikit-image >= 0.26 deprecates SimilarityTransform.estimate, which face_align calls on every crop.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*estimate.*deprecated", category=FutureWarning)
        yield


# --- the backend -----------------------------------------------------------------------------


class InsightFaceBackend(FaceBackendBase):
    """insightface's SCRFD detector and ArcFace recogniser of one model pack, as a types.FaceBackend.

    ``analysis`` is insightface's FaceAnalysis (or an object with its ``det_model``, ``det_size`` and
    ``models`` API); ``pack`` names the model pack it was loaded from, when known.
    """

    model_folder = MODEL_FOLDER

    def __init__(self, analysis: Any, pack: ModelPack | None = None):
        if getattr(analysis, "det_model", None) is None:
            raise FaceAnalysisError(f"face_analysis is a {type(analysis).__name__}, not insightface's FaceAnalysis; "
                                    f"connect IDFuse Load Face Analysis.")
        self.analysis = analysis
        self.pack = pack
        self.name = f"insightface {pack.name}" if pack else "insightface"
        self.embedding_space = pack.embedding_space if pack else self._recognizer_space()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.embedding_space})>"

    # -- loading (FaceBackendBase) --

    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        return tuple(MODEL_PACKS)

    @classmethod
    def providers(cls) -> list[str]:
        return available_providers()

    @classmethod
    def load(cls, model_name: str, model_roots: Sequence[str | Path], provider: str = "CPU",
             det_size: int = DEFAULT_DET_SIZE) -> InsightFaceBackend:
        """The pack's detector and recogniser in an insightface FaceAnalysis prepared for det_size."""
        if det_size < 32 or det_size % 32:
            raise FaceAnalysisError(f"Detection size {det_size} must be a positive multiple of 32 (e.g. 640).")
        insightface = import_insightface()  # first: without it nothing else matters
        folder = find_model_pack(model_name, model_roots)
        providers = provider_chain(provider)
        try:
            # An absolute, existing folder as `name`: insightface then uses it as is and never downloads.
            analysis = insightface.app.FaceAnalysis(name=str(folder), root=str(folder.parent),
                                                    allowed_modules=["detection", "recognition"], providers=providers)
            analysis.prepare(ctx_id=-1 if provider == "CPU" else 0, det_size=(det_size, det_size))
        except AssertionError as error:  # insightface asserts that a detector was found
            raise FaceAnalysisError(f"insightface recognised no face detector in {folder}; the .onnx files may be "
                                    f"damaged. Download {model_name}.zip again from {MODEL_ZOO}.") from error
        except Exception as error:
            raise FaceAnalysisError(f"insightface could not load the models in {folder}: {error}. Check the files "
                                    f"(download {model_name}.zip again from {MODEL_ZOO}) and the onnxruntime "
                                    f"install.") from error
        if "recognition" not in analysis.models:
            raise FaceAnalysisError(f"insightface recognised no face recognition model in {folder}; expected "
                                    f"{MODEL_PACKS[model_name].recognizer}. Download {model_name}.zip again from "
                                    f"{MODEL_ZOO}.")
        active = analysis.det_model.session.get_providers()
        if providers[0] not in active:
            log.warning("%s was requested for the face models but onnxruntime runs them on %s (are the CUDA and "
                        "cuDNN libraries onnxruntime-gpu needs installed?)", provider, ", ".join(active))
        log.info("Loaded insightface %s from %s (%s, detection size %d)", model_name, folder, provider, det_size)
        return cls(analysis, MODEL_PACKS[model_name])

    @classmethod
    def wrap(cls, value: object) -> InsightFaceBackend | None:
        """insightface's own FaceAnalysis (e.g. made by a script or another node pack) as a backend."""
        if getattr(value, "det_model", None) is None:
            return None
        return cls(value)

    @classmethod
    def missing_dependencies(cls) -> str | None:
        try:
            import_insightface()
        except FaceAnalysisError as error:
            return str(error)
        return None

    # -- detection --

    @property
    def detection_sizes(self) -> list[tuple[int, int]]:
        """The prepared detection size, then the smaller fallback sizes; only the model's own for a fixed-size
        detector."""
        shape = getattr(self.analysis.det_model, "input_shape", None)
        if shape is not None and len(shape) == 4 and all(isinstance(v, int) for v in shape[2:4]):
            return [(int(shape[3]), int(shape[2]))]
        prepared = getattr(self.analysis, "det_size", None)
        start = _size_pair(prepared)
        if start is None and isinstance(prepared, (list, tuple)) and prepared:  # insightface 2 accepts a list
            start = max((p for p in map(_size_pair, prepared) if p), default=None, key=lambda p: p[0] * p[1])
        start = start or (DEFAULT_DET_SIZE, DEFAULT_DET_SIZE)
        return [start] + [(s, s) for s in FALLBACK_DET_SIZES if s * s < start[0] * start[1]]

    def detect(self, rgb: np.ndarray) -> DetectedFaces:
        """Detect at each size in turn until faces are found; small and thin photos are padded first."""
        sizes = self.detection_sizes
        searched = f"detection sizes tried: {', '.join(_size_label(size) for size in sizes)}"
        canvas, (dx, dy) = detection_canvas(rgb)
        bgr = np.ascontiguousarray(canvas[:, :, ::-1])  # insightface works on OpenCV's BGR
        for size in sizes:
            found, keypoints = self.analysis.det_model.detect(bgr, input_size=size, max_num=0)
            if len(found) == 0:
                continue
            if keypoints is None:
                raise FaceAnalysisError("The face detector gives no keypoints, which alignment needs; use the "
                                        "detector of buffalo_l or antelopev2.")
            offset = np.array([dx, dy], dtype=np.float32)
            boxes = found[:, :4].astype(np.float32) - np.tile(offset, 2)
            return DetectedFaces.left_to_right(boxes, found[:, 4], keypoints.astype(np.float32) - offset,
                                               tuple(size), searched)
        return DetectedFaces.none_found(searched)

    # -- alignment and embedding --

    def align(self, rgb: np.ndarray, keypoints: np.ndarray, size: int) -> np.ndarray:
        """insightface's ArcFace alignment (similarity transform of the 5 keypoints), size x size RGB uint8."""
        import_insightface()
        from insightface.utils import face_align

        with _quiet_alignment():
            return face_align.norm_crop(rgb, landmark=keypoints, image_size=size)

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """insightface's normed_embedding of one face, through its own recognition model (aligns at 112)."""
        import_insightface()
        from insightface.app.common import Face as InsightFace

        recognizer = self._recognizer()
        if recognizer is None:
            raise FaceAnalysisError("The face analysis has no recognition model; load buffalo_l or antelopev2 with "
                                    "IDFuse Load Face Analysis.")
        if face.keypoints is None:
            raise FaceAnalysisError("The face has no keypoints, which ArcFace alignment needs; detect it with the "
                                    "face analysis that embeds it.")
        insight_face = InsightFace(bbox=face.box, kps=face.keypoints, det_score=face.score)
        with _quiet_alignment():
            recognizer.get(np.ascontiguousarray(rgb[:, :, ::-1]), insight_face)
        return np.asarray(insight_face.normed_embedding, dtype=np.float32)

    def _recognizer(self) -> Any:
        models = getattr(self.analysis, "models", None)
        return models.get("recognition") if isinstance(models, dict) else None

    def _recognizer_space(self) -> str:
        """The embedding space of a FaceAnalysis loaded elsewhere, told by its recogniser's file."""
        model_file = getattr(self._recognizer(), "model_file", None)
        if model_file is None:
            return "unknown"
        name = Path(model_file).name
        known = {pack.recognizer: pack.embedding_space for pack in MODEL_PACKS.values()}
        return known.get(name, f"insightface-{Path(name).stem}")
