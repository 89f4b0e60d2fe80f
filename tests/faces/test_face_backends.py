"""Face backends behind one protocol: the registry, what IDFuse Load Face Analysis hands on, one IMAGE -> RGB
conversion for every detector, and photos that used to crash the detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_idfuse.models.errors import FaceAnalysisError, NoFaceError
from comfyui_idfuse.models.faces import (
    BACKENDS,
    as_face_backend,
    as_face_detector,
    load_backend,
    model_names,
)
from comfyui_idfuse.models.faces.dlib import DlibBackend
from comfyui_idfuse.models.faces.embed import embed_faces
from comfyui_idfuse.models.faces.insightface import InsightFaceBackend
from comfyui_idfuse.models.faces.types import DetectedFaces, FaceBackend, FaceDetector
from comfyui_idfuse.nodes.faces import IDFuseFaceEmbed
from comfyui_idfuse.nodes.glue.training_masks import face_masks
from comfyui_idfuse.nodes.train import IDFuseFaceMasks


def as_image(*photos: np.ndarray) -> torch.Tensor:
    """uint8 photos of one size (1-4 channels) -> a ComfyUI IMAGE batch."""
    return torch.from_numpy(np.stack(photos)).float() / 255.0


class RecordingBackend:
    """A FaceBackend that records the photos it is asked to detect in, and finds no face in them."""

    name = "recording backend"
    embedding_space = "test-space"

    def __init__(self):
        self.seen: list[np.ndarray] = []

    def detect(self, rgb: np.ndarray) -> DetectedFaces:
        self.seen.append(rgb.copy())
        return DetectedFaces.none_found()

    def align(self, rgb, keypoints, size):
        raise AssertionError("nothing to align: no face was found")

    def embed(self, rgb, face):
        raise AssertionError("nothing to embed: no face was found")


# --- the registry and the protocol ---------------------------------------------------------------


def test_one_list_of_backends_gives_the_loader_its_choices():
    from comfyui_idfuse.nodes.faces import IDFuseLoadFaceAnalysis

    assert BACKENDS[0] is InsightFaceBackend
    assert model_names()[:2] == ["buffalo_l", "antelopev2"]
    offered = IDFuseLoadFaceAnalysis.INPUT_TYPES()["required"]["model_name"][0]
    assert sorted(offered) == sorted(model_names())
    with pytest.raises(FaceAnalysisError, match="Unknown face model 'nonexistent'.*buffalo_l, antelopev2"):
        load_backend("nonexistent", lambda folder: [], "CPU", 640)


def test_buffalo_l_is_preselected_when_installed_else_the_built_in_dlib(face_libs, tmp_path):
    from comfyui_idfuse.models.faces import default_first
    from comfyui_idfuse.models.faces.dlib import HOG_MODEL

    assert default_first(lambda folder: [tmp_path])[0] == HOG_MODEL, "a fresh install preselects dlib HOG"
    face_libs.write_model_pack(tmp_path, "antelopev2")
    assert default_first(lambda folder: [tmp_path])[0] == HOG_MODEL, "antelopev2 does not fit FaceID encoders"
    face_libs.write_model_pack(tmp_path, "buffalo_l")
    roots = {"insightface": [tmp_path]}
    assert default_first(lambda folder: roots[folder]) == sorted(model_names(), key=lambda n: n != "buffalo_l")


@pytest.mark.parametrize(("pack", "space"), [("buffalo_l", "arcface-w600k-512"),
                                             ("antelopev2", "arcface-glintr100-512")])
def test_loaded_backend_names_its_embedding_space(face_libs, tmp_path, pack, space):
    face_libs.write_model_pack(tmp_path, pack)
    asked: list[str] = []

    def model_roots(folder: str) -> list:
        asked.append(folder)
        return [tmp_path]

    backend = load_backend(pack, model_roots, "CPU", 640)
    assert asked == ["insightface"]
    assert isinstance(backend, FaceBackend) and backend.name == f"insightface {pack}"
    assert backend.embedding_space == space
    embedding, _ = embed_faces(backend, as_image(face_libs.tom_hanks()))
    assert embedding.embedding_space == space


def test_face_analysis_socket_carries_the_backend(face_libs, insightface_root, monkeypatch):
    import folder_paths

    from comfyui_idfuse.nodes.faces import IDFuseLoadFaceAnalysis

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(insightface_root)], set()))
    (face_analysis,) = IDFuseLoadFaceAnalysis().load("buffalo_l", "CPU", 640)
    assert isinstance(face_analysis, InsightFaceBackend) and isinstance(face_analysis, FaceBackend)
    embedding, _ = IDFuseFaceEmbed().embed(as_image(face_libs.tom_hanks()), face_analysis, "largest", 0,
                                           "normalized mean", "error")
    assert embedding.embedding_space == "arcface-w600k-512" and embedding.arcface.shape == (1, 512)


def test_insightface_own_face_analysis_is_wrapped(face_libs, backend):
    raw = backend.analysis  # insightface's FaceAnalysis, as a script or another pack makes it
    wrapped = as_face_backend(raw)
    assert isinstance(wrapped, InsightFaceBackend) and wrapped.analysis is raw
    assert wrapped.embedding_space == "arcface-w600k-512"  # told by the recogniser's file, w600k_r50.onnx
    photo = as_image(face_libs.tom_hanks())
    torch.testing.assert_close(embed_faces(wrapped, photo)[0].arcface, embed_faces(backend, photo)[0].arcface)
    assert as_face_backend(backend) is backend


class DetectOnly:
    """A FaceDetector that finds faces but cannot embed them (e.g. a plain box detector)."""

    name = "box detector"

    def detect(self, rgb: np.ndarray) -> DetectedFaces:
        return DetectedFaces.left_to_right(np.array([[8.0, 8.0, 40.0, 40.0]]), np.array([0.9]), None)


def test_a_detect_only_backend_makes_masks_but_no_embedding():
    detector = DetectOnly()
    assert isinstance(detector, FaceDetector) and not isinstance(detector, FaceBackend)
    assert as_face_detector(detector) is detector
    with pytest.raises(FaceAnalysisError, match="only detects faces"):
        as_face_backend(detector)
    with pytest.raises(FaceAnalysisError, match="cannot embed faces"):
        embed_faces(detector, torch.zeros(1, 64, 64, 3))
    with pytest.raises(FaceAnalysisError, match="face_analysis is a object, not a face backend"):
        as_face_detector(object())


# --- one conversion to RGB ---------------------------------------------------------------------------


def _photo_variants() -> dict[str, np.ndarray]:
    from skimage import data

    photo = data.astronaut()
    alpha = np.tile(np.linspace(0, 255, photo.shape[1]).round().astype(np.uint8), (photo.shape[0], 1))[..., None]
    grey = np.round(photo @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
    return {"rgba": np.concatenate([photo, alpha], axis=-1), "grey": grey,
            "grey+alpha": np.concatenate([grey, alpha], axis=-1)}


@pytest.mark.parametrize("kind", ["rgba", "grey", "grey+alpha"])
def test_face_masks_and_face_embed_detectors_see_the_same_pixels(kind, monkeypatch):
    photo = _photo_variants()[kind]
    images = as_image(photo)
    recorder = RecordingBackend()
    with pytest.raises(NoFaceError, match="No face found"):
        IDFuseFaceMasks().find(images, face_analysis=recorder)
    with pytest.raises(NoFaceError):
        IDFuseFaceEmbed().embed(images, recorder, "largest", 0, "normalized mean", "error")
    masks_pixels, embed_pixels = recorder.seen
    assert masks_pixels.dtype == np.uint8 and masks_pixels.shape == (512, 512, 3)
    np.testing.assert_array_equal(masks_pixels, embed_pixels)

    # ... and the built-in detector (Face Masks without a face analysis) gets them too.
    seen: list[np.ndarray] = []
    monkeypatch.setattr(DlibBackend, "detect", lambda self, rgb: seen.append(rgb.copy()) or DetectedFaces.none_found())
    with pytest.raises(NoFaceError, match="No face found"):
        IDFuseFaceMasks().find(images)
    np.testing.assert_array_equal(seen[0], embed_pixels)

    # Alpha is composited over black, grey repeated into three channels.
    colour = photo[..., :3] if photo.shape[-1] >= 3 else np.repeat(photo[..., :1], 3, axis=-1)
    alpha = photo[..., -1:] / 255.0 if photo.shape[-1] in (2, 4) else 1.0
    expected = np.round(colour / 255.0 * alpha * 255.0)
    assert np.abs(embed_pixels.astype(np.float64) - expected).max() <= 1


# --- photos that used to crash or mislead --------------------------------------------------------


@pytest.fixture(scope="module")
def thin_photos(face_libs) -> dict[str, np.ndarray]:
    import cv2

    strip = cv2.resize(face_libs.astronaut(), (4000, 8), interpolation=cv2.INTER_AREA)  # 8 high, 4000 wide
    return {"wide": strip, "tall": np.ascontiguousarray(strip.transpose(1, 0, 2))}


@pytest.mark.parametrize("orientation", ["wide", "tall"])
def test_thin_photos_are_no_face_instead_of_a_detector_crash(backend, thin_photos, orientation):
    photo = thin_photos[orientation]
    size = f"{photo.shape[1]}x{photo.shape[0]} px"
    with pytest.raises(NoFaceError, match=rf"No face found in photo 1 of 1 \({size}\) \(detection sizes tried"):
        IDFuseFaceEmbed().embed(as_image(photo), backend, "largest", 0, "normalized mean", "error")
    with pytest.raises(NoFaceError, match=r"photo 1 of 2 .*photo 2 of 2 "):
        embed_faces(backend, as_image(photo, photo), on_no_face="skip")
    for face_analysis in (backend, None):  # insightface's detector, and the built-in one
        with pytest.raises(NoFaceError, match=r"No face found in photo\(s\) \[1\] of 1"):
            IDFuseFaceMasks().find(as_image(photo), face_analysis=face_analysis)


def test_thin_photo_detection_keeps_faces_in_the_photos_pixels(face_libs, backend):
    # A face on a strip just past the aspect limit: the padding is along the short side only, so the
    # detector shrinks the photo as before and the box comes back in the strip's own pixels.
    import cv2

    # 240 px shrink to 64 at detection size 640: the size of the synthetic detector's smallest anchor.
    face = cv2.resize(face_libs.tom_hanks(), (240, 240), interpolation=cv2.INTER_CUBIC)
    strip = np.full((256, 2400, 3), 128, np.uint8)
    strip[8:248, 1080:1320] = face
    faces = backend.detect(strip)
    assert len(faces) == 1 and faces.det_size == (640, 640)
    x1, y1, x2, y2 = faces.boxes[0]
    assert 1080 - 30 < x1 < x2 < 1320 + 30 and -30 < y1 < y2 < 256 + 30


def test_face_masks_no_face_message_offers_only_what_the_node_has():
    from skimage import data

    images = as_image(data.coffee()[:400, :400])
    with pytest.raises(NoFaceError) as error:
        IDFuseFaceMasks().find(images)
    message = str(error.value)
    assert "No face found in photo(s) [1] of 1" in message
    assert "attention_mode" not in message and "connect face masks" not in message
    assert "IDFuse Load Face Analysis" in message
    with pytest.raises(NoFaceError) as error:  # already connected: not offered again
        IDFuseFaceMasks().find(images, face_analysis=RecordingBackend())
    assert "attention_mode" not in str(error.value) and "IDFuse Load Face Analysis" not in str(error.value)
    # The trainer, which has those settings, offers them.
    with pytest.raises(NoFaceError, match="connect face masks to masks.*attention_mode reference_prompt"):
        face_masks(images, None, required=True, for_trainer=True)
