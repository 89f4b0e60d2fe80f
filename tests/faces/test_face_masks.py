"""Face masks without a MASK input: the built-in detector (dlib's HOG) on real photos, the IDFuse Face Masks
node, and the trainer finding the face itself."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from skimage import data

from comfyui_idfuse.models.errors import TrainingError
from comfyui_idfuse.models.faces.masks import built_in_detector, ellipse_mask
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


def test_missing_dlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)
    images = as_image(data.astronaut())
    with pytest.raises(TrainingError, match="pip install dlib-bin face-recognition-models"):
        face_masks(images, None, required=True)
    assert face_masks(images, None, required=False) is None


# --- the built-in detector: dlib's HOG, which replaced the cascade ------------------------------------

# Face centres (x, y) in insightface's t1.jpg, read off by eye, left to right (as in test_dlib_backend.py).
GROUP_FACE_CENTRES = ((115, 331), (317, 217), (512, 357), (784, 413), (944, 136), (1173, 344))


def faces_at(boxes, centres, tolerance: float = 0.3) -> list[int]:
    """Indices of the labelled centres that a box is centred on (within tolerance x its width)."""
    hits = []
    for index, (x, y) in enumerate(centres):
        for x1, y1, x2, y2 in boxes:
            if np.hypot((x1 + x2) / 2 - x, (y1 + y2) / 2 - y) < tolerance * (x2 - x1):
                hits.append(index)
                break
    return hits


def test_built_in_detector_is_dlib_hog():
    pytest.importorskip("dlib", reason="the built-in face detector is dlib (requirements.txt)")
    from comfyui_idfuse.models.faces.dlib import HOG_MODEL, DlibBackend

    detector = built_in_detector()
    assert isinstance(detector, DlibBackend) and detector.name == HOG_MODEL


def test_face_masks_node_masks_the_largest_face_of_a_group():
    pytest.importorskip("dlib", reason="the built-in face detector is dlib (requirements.txt)")
    group = insightface_photo("t1.jpg")
    masks, _ = IDFuseFaceMasks().find(as_image(group))
    assert masks.shape == (1,) + group.shape[:2]
    largest = built_in_detector().detect(group).largest_box()
    centre_x, centre_y = int((largest[0] + largest[2]) / 2), int((largest[1] + largest[3]) / 2)
    assert masks[0, centre_y, centre_x] == 1
    assert faces_at([largest], GROUP_FACE_CENTRES) == [2]  # the man in the middle, nearest the camera
    for x, y in GROUP_FACE_CENTRES[:2] + GROUP_FACE_CENTRES[3:]:
        assert masks[0, y, x] == 0  # the others are not masked


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
