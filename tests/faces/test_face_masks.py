"""Face masks without a MASK input: the built-in cascade on real photos, the IDFuse Face Masks node,
and the trainer finding the face itself."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from skimage import data

from comfyui_idfuse.models.errors import TrainingError
from comfyui_idfuse.models.faces.cascade import CascadeFaceDetector
from comfyui_idfuse.models.faces.masks import ellipse_mask
from comfyui_idfuse.nodes import NODE_CLASS_MAPPINGS
from comfyui_idfuse.nodes.glue.training_masks import face_masks
from comfyui_idfuse.nodes.train import IDFuseFaceMasks

# Hand-labelled face of scikit-image's astronaut (x1, y1, x2, y2): brows to chin, cheek to cheek.
ASTRONAUT_FACE = (176.0, 70.0, 272.0, 178.0)


def iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def as_image(*rgbs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(rgbs).astype(np.float32) / 255.0)


def insightface_photo(name: str) -> np.ndarray:
    pytest.importorskip("insightface", reason="insightface's sample photos need insightface (requirements-face.txt)")
    import onnx_faces

    return onnx_faces.insightface_sample(name)


@pytest.fixture(scope="module")
def detector() -> CascadeFaceDetector:
    return CascadeFaceDetector()


def test_cascade_finds_the_astronauts_face_and_its_mirror_image(detector):
    box = detector.detect(data.astronaut()).largest_box()
    assert iou(box, ASTRONAUT_FACE) > 0.6, box
    mirrored = detector.detect(np.ascontiguousarray(data.astronaut()[:, ::-1])).largest_box()
    expected = (512 - ASTRONAUT_FACE[2], ASTRONAUT_FACE[1], 512 - ASTRONAUT_FACE[0], ASTRONAUT_FACE[3])
    assert iou(mirrored, expected) > 0.6, mirrored


def test_cascade_finds_a_face_that_fills_the_photo(detector):
    # an aligned 112x112 crop: the face is the photo
    box = detector.detect(insightface_photo("Tom_Hanks_54745.png")).largest_box()
    assert box is not None
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    assert abs(centre[0] - 56) < 10 and abs(centre[1] - 60) < 12 and box[2] - box[0] > 50, box


def test_cascade_picks_the_largest_face_of_a_group(detector):
    photo = insightface_photo("t1.jpg")  # six people
    box = detector.detect(photo).largest_box()
    assert box is not None and 100 < box[2] - box[0] < 260, box
    # the face is one of the group's: cropping everything else away finds it again
    x1, y1, x2, y2 = (int(v) for v in box)
    pad = (x2 - x1) // 2
    crop = photo[max(0, y1 - pad):y2 + pad, max(0, x1 - pad):x2 + pad]
    assert detector.detect(np.ascontiguousarray(crop)).largest_box() is not None


@pytest.mark.parametrize("name", ["coffee", "chelsea", "rocket", "retina", "camera"])
def test_cascade_finds_nothing_in_photos_without_a_face(detector, name):
    photo = getattr(data, name)()
    if photo.ndim == 2:
        photo = np.stack([photo] * 3, axis=-1)
    assert detector.detect(photo).largest_box() is None


def test_node_makes_one_mask_per_photo_and_a_preview():
    assert NODE_CLASS_MAPPINGS["IDFuseFaceMasks"] is IDFuseFaceMasks
    images = as_image(data.astronaut(), np.ascontiguousarray(data.astronaut()[:, ::-1]))
    masks, preview = IDFuseFaceMasks().find(images)
    assert masks.shape == (2, 512, 512) and preview.shape == (2, 512, 512, 3)
    assert masks[0, 120, 224] == 1 and masks[1, 120, 512 - 224] == 1  # the face's centre
    assert masks[0, 400, 60] == 0 and masks[:, :20].sum() == 0
    # the mask covers the labelled face, and not much more than an ellipse around it
    face = ellipse_mask(512, 512, ASTRONAUT_FACE)
    assert float((masks[0] * face).sum() / face.sum()) > 0.8
    assert float(masks[0].sum() / face.sum()) < 1.6
    torch.testing.assert_close(preview[0][masks[0] > 0], images[0][masks[0] > 0])
    torch.testing.assert_close(preview[0][masks[0] == 0], 0.3 * images[0][masks[0] == 0])


def test_no_face_is_an_error_naming_the_photo():
    images = as_image(data.astronaut(), data.coffee()[:400, :400].repeat(2, 0).repeat(2, 1)[:512, :512])
    with pytest.raises(TrainingError, match=r"No face found in photo\(s\) \[2\] of 2"):
        IDFuseFaceMasks().find(images)
    assert face_masks(images, None, required=False) is None


def test_missing_scikit_image_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.feature", None)
    images = as_image(data.astronaut())
    with pytest.raises(TrainingError, match="pip install scikit-image"):
        face_masks(images, None, required=True)
    assert face_masks(images, None, required=False) is None


def test_trainer_finds_the_face_itself(tokenizer_dir):
    """No masks, no face analysis, attention_mode face_mask: the trainer masks the astronaut's face."""
    from factories import make_clip, make_model, tiny_vae
    from trainer_inputs import settings

    from comfyui_idfuse.nodes.train import IDFuseTrainIdentity

    with torch.inference_mode():
        outputs = IDFuseTrainIdentity().train(make_model("sd15"), make_clip("sd15", tokenizer_dir), tiny_vae(),
                                              as_image(data.astronaut()), **settings(
                                                  save_name="found_face", steps=1, lora_rank=0,
                                                  attention_mode="face_mask"))
    share = json.loads(outputs[5])["face_attention_share"]
    assert share["before"] is not None and "per_photo" in share
