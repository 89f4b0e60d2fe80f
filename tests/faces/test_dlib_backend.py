"""The dlib face backend on its real, public-domain weights (dlib-bin + face-recognition-models) and on real
photos that ship in packages: boxes against hand labels, dlib's 0.6 same-person distance, the photos that
must give a face or a clear "no face", IDFuse Load Face Analysis / IDFuse Face Embed end to end."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("dlib", reason="the dlib backend tests need dlib (pip install dlib-bin)")
pytest.importorskip("skimage", reason="the photos come with scikit-image")

from skimage import data  # noqa: E402

from comfyui_idfuse.models.errors import FaceAnalysisError, NoFaceError  # noqa: E402
from comfyui_idfuse.models.faces import BACKENDS, as_face_backend, backend_kind, load_backend, model_names  # noqa: E402
from comfyui_idfuse.models.faces import dlib as dlib_faces  # noqa: E402
from comfyui_idfuse.models.faces.dlib import (  # noqa: E402
    ARCFACE_TEMPLATE_112,
    CNN_MODEL,
    HOG_MODEL,
    SAME_PERSON_DISTANCE,
    DlibBackend,
    descriptor_distance,
    keypoints_from_dlib_points,
    unit_distance_threshold,
)
from comfyui_idfuse.models.faces.embed import embed_faces  # noqa: E402
from comfyui_idfuse.models.faces.types import FaceBackend  # noqa: E402

try:
    dlib_faces.model_file(dlib_faces.RECOGNITION_MODEL)
except FaceAnalysisError as error:
    pytest.skip(f"face-recognition-models is not installed: {error}", allow_module_level=True)

# Hand-labelled face of scikit-image's astronaut (x1, y1, x2, y2): brows to chin, cheek to cheek (as in
# test_face_masks.py).
ASTRONAUT_FACE = (176.0, 70.0, 272.0, 178.0)
# Face centres (x, y) in insightface's t1.jpg (1280x886, six people), read off by eye from the photo shown at
# 960 px wide and scaled back, left to right.
GROUP_FACE_CENTRES = ((115, 331), (317, 217), (512, 357), (784, 413), (944, 136), (1173, 344))


def iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def mirrored(box):
    return (512 - box[2], box[1], 512 - box[0], box[3])


def as_image(*photos: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(photos)).float() / 255.0


def insightface_photo(name: str) -> np.ndarray:
    pytest.importorskip("insightface", reason="insightface's sample photos come with insightface")
    pytest.importorskip("cv2", reason="insightface's sample photos are read with OpenCV")
    import onnx_faces

    return onnx_faces.insightface_sample(name)


def faceless_photos() -> dict[str, np.ndarray]:
    photos = {name: getattr(data, name)() for name in ("coffee", "chelsea", "rocket")}
    return {name: photo if photo.ndim == 3 else np.stack([photo] * 3, -1) for name, photo in photos.items()}


@pytest.fixture(scope="module")
def hog() -> DlibBackend:
    return DlibBackend.load(HOG_MODEL, [], "CPU", 640)


@pytest.fixture(scope="module")
def cnn() -> DlibBackend:
    # 384: the CNN's time grows with det_size squared; the astronaut's face is still ~70 px there
    return DlibBackend.load(CNN_MODEL, [], "CPU", 384)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


# --- registry and loading ------------------------------------------------------------------------


def test_load_face_analysis_offers_dlib_after_insightface(monkeypatch):
    from comfyui_idfuse.models.faces.insightface import InsightFaceBackend
    from comfyui_idfuse.nodes.faces import IDFuseLoadFaceAnalysis

    assert BACKENDS.index(InsightFaceBackend) < BACKENDS.index(DlibBackend)
    assert model_names()[-2:] == [HOG_MODEL, CNN_MODEL]
    assert HOG_MODEL in IDFuseLoadFaceAnalysis.INPUT_TYPES()["required"]["model_name"][0]
    assert backend_kind(CNN_MODEL) is DlibBackend
    # its files come with a pip package: no ComfyUI model folder is asked for
    asked: list[str] = []
    backend = load_backend(HOG_MODEL, lambda folder: asked.append(folder) or [], "CPU", 640)
    assert asked == [] and isinstance(backend, FaceBackend)
    assert backend.embedding_space == "dlib-resnet-128" and backend.name == HOG_MODEL
    assert as_face_backend(backend) is backend
    (loaded,) = IDFuseLoadFaceAnalysis().load(HOG_MODEL, "CPU", 640)
    assert isinstance(loaded, DlibBackend) and loaded.det_size == 640


def test_cuda_is_refused_where_dlib_has_none(monkeypatch):
    import dlib

    monkeypatch.setattr(dlib, "DLIB_USE_CUDA", False)
    assert DlibBackend.providers() == ["CPU"]
    with pytest.raises(FaceAnalysisError, match="built without CUDA.*Choose CPU"):
        DlibBackend.load(HOG_MODEL, [], "CUDA", 640)
    monkeypatch.setattr(dlib, "DLIB_USE_CUDA", True)
    assert DlibBackend.providers() == ["CPU", "CUDA"]


def test_missing_dlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)
    assert "pip install dlib-bin face-recognition-models" in DlibBackend.missing_dependencies()
    with pytest.raises(FaceAnalysisError, match="pip install dlib-bin face-recognition-models"):
        DlibBackend.load(HOG_MODEL, [], "CPU", 640)


def test_model_files_are_found_without_importing_the_model_package(monkeypatch):
    # face_recognition_models' __init__ imports pkg_resources, gone from setuptools >= 81
    monkeypatch.delitem(sys.modules, "face_recognition_models", raising=False)
    monkeypatch.setitem(sys.modules, "pkg_resources", None)
    with pytest.raises(ImportError):
        import face_recognition_models  # noqa: F401
    monkeypatch.delitem(sys.modules, "face_recognition_models", raising=False)
    assert dlib_faces.model_file(dlib_faces.LANDMARK_MODEL).name == "shape_predictor_5_face_landmarks.dat"
    assert DlibBackend.missing_dependencies() is None
    with pytest.raises(FaceAnalysisError, match="shape_predictor_68.*not installed or incomplete"):
        dlib_faces.model_file("shape_predictor_68_face_landmarks.datx")


# --- detection against hand labels ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["hog", "cnn"])
def test_finds_the_astronaut_and_its_mirror_image(request, astronaut, which):
    backend = request.getfixturevalue(which)
    faces = backend.detect(astronaut)
    assert len(faces) == 1 and iou(faces.boxes[0], ASTRONAUT_FACE) > 0.65, faces.boxes
    flipped = backend.detect(np.ascontiguousarray(astronaut[:, ::-1]))
    assert len(flipped) == 1 and iou(flipped.boxes[0], mirrored(ASTRONAUT_FACE)) > 0.65, flipped.boxes
    assert faces.keypoints.shape == (1, 5, 2)
    left_eye, right_eye, nose, mouth_left, mouth_right = faces.keypoints[0]
    # KEYPOINT_NAMES order: the left eye is on the photo's left; nose below the eyes, mouth below the nose
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1]) < ASTRONAUT_FACE[3]


def test_hog_finds_every_face_of_the_group_photo(hog):
    faces = hog.detect(insightface_photo("t1.jpg"))
    assert len(faces) == len(GROUP_FACE_CENTRES)
    centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2  # left to right, as the labels
    widths = faces.boxes[:, 2] - faces.boxes[:, 0]
    distance = np.linalg.norm(centres - np.array(GROUP_FACE_CENTRES), axis=1)
    assert (distance < 0.25 * widths).all(), (centres, widths)
    assert (widths > 80).all() and (widths < 160).all(), widths


def test_finds_a_face_that_fills_the_photo_and_places_the_arcface_keypoints(hog):
    photo = insightface_photo("Tom_Hanks_54745.png")  # already an ArcFace-aligned 112 crop
    faces = hog.detect(photo)
    assert len(faces) == 1
    # the five keypoints land near the ArcFace template the crop was aligned to (nose and mouth estimated)
    assert np.abs(faces.keypoints[0] - ARCFACE_TEMPLATE_112).max() < 4.0, faces.keypoints[0]
    # so aligning it again at 112 gives nearly the same picture
    realigned = hog.align(photo, faces.keypoints[0], 112).astype(np.float32)
    assert np.abs(realigned - photo.astype(np.float32))[16:-16, 16:-16].mean() < 20


def test_dlib_points_become_insightface_keypoint_order():
    # dlib's 5 points of a face: photo-right eye corners, photo-left eye corners, nose bottom
    points = np.array([[80, 50], [66, 50], [30, 50], [44, 50], [55, 80]], dtype=np.float64)
    keypoints = keypoints_from_dlib_points(points)
    np.testing.assert_allclose(keypoints[0], [37, 50])  # left eye: mean of its two corners
    np.testing.assert_allclose(keypoints[1], [73, 50])
    assert 50 < keypoints[2, 1] < 80  # the nose tip is above the nose bottom
    assert keypoints[3, 0] < 55 < keypoints[4, 0] and (keypoints[3:, 1] > 80).all()  # mouth below the nose


@pytest.mark.parametrize("name", ["coffee", "chelsea", "rocket"])
def test_finds_nothing_in_photos_without_a_face(hog, name):
    assert len(hog.detect(faceless_photos()[name])) == 0


def test_finds_nothing_in_a_mask_on_its_own(hog):
    assert len(hog.detect(insightface_photo("mask_blue.jpg"))) == 0


# --- embedding and dlib's 0.6 rule ----------------------------------------------------------------


def test_same_person_is_below_0_6_and_different_people_above(hog, astronaut):
    def descriptor(photo):
        faces = hog.detect(photo)
        return hog.descriptor(photo, faces[faces.largest()])

    eileen = descriptor(astronaut)
    assert eileen.shape == (128,) and eileen.dtype == np.float32
    assert 1.2 < np.linalg.norm(eileen) < 1.8  # raw descriptors are not unit length: 0.6 applies to these
    assert descriptor_distance(eileen, descriptor(np.ascontiguousarray(astronaut[:, ::-1]))) < SAME_PERSON_DISTANCE
    # a smaller copy of the photo is the same person too
    small = astronaut[::2, ::2].copy()
    assert descriptor_distance(eileen, descriptor(small)) < SAME_PERSON_DISTANCE
    tom = descriptor(insightface_photo("Tom_Hanks_54745.png"))
    assert descriptor_distance(eileen, tom) > SAME_PERSON_DISTANCE
    group = insightface_photo("t1.jpg")
    faces = hog.detect(group)
    people = [hog.descriptor(group, faces[i]) for i in range(len(faces))] + [eileen, tom]
    for first, second in itertools.combinations(people, 2):  # eight different people
        assert descriptor_distance(first, second) > SAME_PERSON_DISTANCE


def test_embed_is_the_unit_length_descriptor(hog, astronaut):
    faces = hog.detect(astronaut)
    raw, unit = hog.descriptor(astronaut, faces[0]), hog.embed(astronaut, faces[0])
    assert unit.dtype == np.float32 and abs(float(np.linalg.norm(unit)) - 1) < 1e-5
    np.testing.assert_allclose(unit * np.linalg.norm(raw), raw, rtol=1e-5, atol=1e-6)
    mirrored_faces = hog.detect(np.ascontiguousarray(astronaut[:, ::-1]))
    other = hog.embed(np.ascontiguousarray(astronaut[:, ::-1]), mirrored_faces[0])
    assert np.linalg.norm(unit - other) < unit_distance_threshold() < np.sqrt(2)


def test_face_chip_is_dlibs_150_px_chip(hog, astronaut):
    chip = hog.face_chip(astronaut, hog.detect(astronaut)[0])
    assert chip.shape == (150, 150, 3) and chip.dtype == np.uint8


# --- IDFuse Face Embed end to end, and photos that must not crash -------------------------------------


def test_face_embed_node_with_the_dlib_backend(hog, astronaut):
    from comfyui_idfuse.nodes.faces import IDFuseFaceEmbed

    images = as_image(astronaut, np.ascontiguousarray(astronaut[:, ::-1]))
    clip_batches = []

    def clip_encoder(crops):
        clip_batches.append(crops)
        return torch.ones(crops.shape[0], 257, 1280)

    embedding, preview = embed_faces(hog, images, clip_encoder=clip_encoder)
    assert embedding.embedding_space == "dlib-resnet-128"
    assert embedding.arcface.shape == (1, 128) and embedding.per_photo_arcface.shape == (2, 128)
    assert torch.allclose(embedding.arcface.norm(dim=-1), torch.ones(1))
    assert embedding.clip_hidden.shape == (1, 257, 1280) and clip_batches[0].shape == (2, 224, 224, 3)
    assert preview.shape == (2, 512, 512, 3)
    node_embedding, _ = IDFuseFaceEmbed().embed(images, hog, "largest", 0, "normalized mean", "error")
    torch.testing.assert_close(node_embedding.arcface, embedding.arcface)


def _variants(astronaut: np.ndarray) -> dict[str, torch.Tensor]:
    """ComfyUI IMAGEs of the astronaut in the forms users feed; float 0..1 like every IMAGE."""
    grey = np.round(astronaut @ np.array([0.299, 0.587, 0.114]))[..., None]
    alpha = np.full(astronaut.shape[:2] + (1,), 255.0)
    sixteen_bit = astronaut.astype(np.float64) * 257  # a 16-bit PNG as a loader scales it: 0..65535 -> 0..1
    huge = np.kron(astronaut, np.ones((8, 8, 1), dtype=np.uint8))  # 4096x4096
    return {"grey": torch.from_numpy(grey / 255.0).float()[None],
            "rgba": torch.from_numpy(np.concatenate([astronaut, alpha], -1) / 255.0).float()[None],
            "16-bit": torch.from_numpy(sixteen_bit / 65535.0).float()[None],
            "huge": torch.from_numpy(huge).float()[None] / 255.0}


@pytest.fixture(scope="module")
def astronaut_embedding(hog, astronaut):
    return embed_faces(hog, as_image(astronaut))[0]


@pytest.mark.parametrize("kind", ["grey", "rgba", "16-bit", "huge"])
def test_every_form_of_the_photo_finds_the_same_person(hog, astronaut, astronaut_embedding, kind):
    reference = astronaut_embedding
    embedding, _ = embed_faces(hog, _variants(astronaut)[kind])
    scale = embedding.boxes[0] / torch.tensor(ASTRONAUT_FACE)
    assert embedding.num_photos == 1 and float(scale.mean()) > 0.5
    distance = float((embedding.per_photo_arcface - reference.per_photo_arcface).norm())
    assert distance < unit_distance_threshold(), distance


@pytest.mark.parametrize("size", [1, 8, 24, 48])
def test_tiny_photos_give_a_clear_no_face_error(hog, size):
    with pytest.raises(NoFaceError, match="No face found"):
        embed_faces(hog, torch.rand(1, size, size, 3))


def test_faceless_photos_give_a_clear_no_face_error_and_can_be_skipped(hog, astronaut):
    coffee = faceless_photos()["coffee"][:400, :400]
    with pytest.raises(NoFaceError, match=r"No face found in photo 1 of 1 \(400x400 px\) \(HOG detector"):
        embed_faces(hog, as_image(coffee))
    embedding, preview = embed_faces(hog, as_image(coffee, astronaut[:400, :400]), on_no_face="skip")
    assert embedding.num_photos == 1 and preview.shape[0] == 2
    with pytest.raises(NoFaceError):
        embed_faces(hog, torch.zeros(1, 600, 300, 3))  # black
    with pytest.raises(NoFaceError):
        embed_faces(hog, torch.ones(1, 16, 2000, 3))  # a thin white strip
