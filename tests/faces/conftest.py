"""Fixtures of the face tests: insightface's own code on the tiny synthetic ONNX models of
tests/support/onnx_faces.py."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def face_libs():
    for module in ("insightface", "onnxruntime", "onnx", "cv2", "skimage"):
        pytest.importorskip(module, reason=f"the face tests need {module} (requirements-face.txt)")
    import onnx_faces

    return onnx_faces


@pytest.fixture(scope="module")
def insightface_root(face_libs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("insightface")
    face_libs.write_model_pack(root, "buffalo_l")
    return root


@pytest.fixture(scope="module")
def backend(insightface_root):
    """The buffalo_l face backend, as IDFuse Load Face Analysis gives it."""
    from comfyui_idfuse.models.faces.insightface import InsightFaceBackend

    return InsightFaceBackend.load("buffalo_l", [insightface_root], "CPU", 640)
