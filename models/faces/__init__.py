"""Faces: find, align and embed the faces in photos, through interchangeable backends.

types.py says what a backend is (FaceDetector, FaceBackend) and holds the face data; images.py is the
one IMAGE -> RGB conversion; embed.py, masks.py and preview.py work over any backend. Each kind of
backend that IDFuse Load Face Analysis can load is one file (insightface.py, dlib.py) and one entry in
``BACKENDS`` below; masks.py names the built-in detector of face masks (dlib's HOG).

No ComfyUI imports: nodes/faces.py and nodes/glue/training_masks.py are the glue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import FaceAnalysisError
from .dlib import HOG_MODEL as DLIB_HOG_MODEL
from .dlib import DlibBackend
from .insightface import RECOMMENDED_PACK, InsightFaceBackend, find_model_pack
from .types import FaceBackend, FaceBackendBase, FaceDetector

# insightface's packs first (when present, they are what most encoders were trained with), then dlib's
# public-domain models, which come with requirements.txt: without insightface, the default.
BACKENDS: list[type[FaceBackendBase]] = [InsightFaceBackend, DlibBackend]


def model_names() -> list[str]:
    """Every backend's model names, in list order: IDFuse Load Face Analysis' model_name choices."""
    return [name for kind in BACKENDS for name in kind.model_names()]


def default_first(model_roots: Callable[[str], Sequence[str | Path]]) -> list[str]:
    """model_names() with the one to preselect first (ComfyUI preselects a combo's first choice): buffalo_l when
    insightface and its files are here (IP-Adapter FaceID needs its w600k embeddings), else the built-in dlib HOG,
    which works on a fresh install."""
    names = model_names()
    preferred = DLIB_HOG_MODEL
    if InsightFaceBackend.missing_dependencies() is None:
        try:
            find_model_pack(RECOMMENDED_PACK, model_roots(InsightFaceBackend.model_folder))
            preferred = RECOMMENDED_PACK
        except FaceAnalysisError:
            pass
    return sorted(names, key=lambda name: name != preferred)


def providers() -> list[str]:
    """Execution providers at least one backend can run on here, CPU first."""
    labels: list[str] = []
    for kind in BACKENDS:
        labels += [label for label in kind.providers() if label not in labels]
    return labels


def backend_kind(model_name: str) -> type[FaceBackendBase]:
    for kind in BACKENDS:
        if model_name in kind.model_names():
            return kind
    raise FaceAnalysisError(f"Unknown face model '{model_name}'; use one of {', '.join(model_names())}.")


def load_backend(model_name: str, model_roots: Callable[[str], Sequence[str | Path]], provider: str,
                 det_size: int) -> FaceBackend:
    """Load model_name with its backend; ``model_roots(folder)`` lists the paths of a model folder."""
    kind = backend_kind(model_name)
    # A kind whose files come with a pip package (dlib) has no ComfyUI model folder to search.
    roots = model_roots(kind.model_folder) if kind.model_folder else []
    return kind.load(model_name, roots, provider, det_size)


def as_face_detector(value: object) -> FaceDetector:
    """What is connected to a face_analysis input, as a detector: a backend as it is, or a library's own
    model object (insightface's FaceAnalysis) wrapped by its kind."""
    if isinstance(value, FaceDetector):
        return value
    for kind in BACKENDS:
        wrapped = kind.wrap(value)
        if wrapped is not None:
            return wrapped
    message = f"face_analysis is a {type(value).__name__}, not a face backend; connect IDFuse Load Face Analysis."
    # With no backend able to run, the loader could not have made one either: say what to install.
    missing = [kind.missing_dependencies() for kind in BACKENDS]
    if all(missing):
        message += " " + " ".join(missing)
    raise FaceAnalysisError(message)


def as_face_backend(value: object) -> FaceBackend:
    """What is connected to a face_analysis input, as a backend that also aligns and embeds."""
    detector = as_face_detector(value)
    if not isinstance(detector, FaceBackend):
        raise FaceAnalysisError(f"{detector.name} only detects faces; embedding needs IDFuse Load Face Analysis "
                                f"connected to face_analysis.")
    return detector
