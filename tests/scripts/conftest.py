"""Photos of the data-preparation tests, from packages: scikit-image's astronaut and insightface's Tom Hanks crop,
several augmented views (flip, crop, colour) standing in for different photos of one person; real photos without a
face; a broken file."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))


def astronaut_views() -> dict[str, np.ndarray]:
    """Her head and shoulders (the rows above the mission patch, which dlib's HOG takes for a face in some views)."""
    from onnx_faces import astronaut

    top = astronaut()[:300]
    jittered = np.clip(top[10:, 40:480].astype(np.float32) * np.array([1.1, 0.95, 0.85]) + 8, 0, 255)
    return {"front.jpg": top, "mirrored.png": np.ascontiguousarray(top[:, ::-1]),
            "warm_crop.png": jittered.astype(np.uint8)}


def tom_views() -> dict[str, np.ndarray]:
    from face_photos import on_canvas
    from onnx_faces import tom_hanks

    face = tom_hanks()
    darker = np.clip(on_canvas(face, 260, (60, 200)).astype(np.float32) * 0.8 + 20, 0, 255).astype(np.uint8)
    return {"wall.png": on_canvas(face, 240, (130, 100)), "mirrored.png": on_canvas(face[:, ::-1].copy(), 200,
                                                                                     (200, 150)),
            "darker.png": darker}


def faceless() -> dict[str, np.ndarray]:
    from skimage import data

    return {"coffee.png": data.coffee(), "cat.png": data.chelsea()}


def save(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95)


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """root/<identity>/*: eileen (3 views and a broken file), nobody (2 photos without a face), tom (3 views)."""
    root = tmp_path_factory.mktemp("photos")
    for identity, photos in (("eileen", astronaut_views()), ("nobody", faceless()), ("tom", tom_views())):
        for name, rgb in photos.items():
            save(root / identity / name, rgb)
    (root / "eileen" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return root


@pytest.fixture(scope="session")
def two_faces_photo() -> np.ndarray:
    """Her view and its mirror image side by side: one photo, two faces of the same size."""
    top = astronaut_views()["front.jpg"]
    return np.concatenate([top, np.ascontiguousarray(top[:, ::-1])], axis=1)
