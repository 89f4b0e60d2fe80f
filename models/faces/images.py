"""The one conversion from ComfyUI IMAGEs to the pixels face detectors see, and the padding detectors need.

Every path that looks for faces (IDFuse Face Embed, IDFuse Face Masks, the trainer's photos) converts
through ``rgb_float`` / ``rgb_uint8`` here, so one photo gives the same pixels to every detector.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import FaceAnalysisError, IDFuseInputError

# Photos whose longer side is below this are padded (black, centred) to twice their size before
# detection: a tight face crop gives the detector no context and is upscaled past its anchors.
SMALL_IMAGE_SIDE = 256
# Longer side at most this many times the shorter one when a detector sees a photo: a detector that
# shrinks a thin strip (8x4000) to its input size would otherwise get a side of 0 pixels.
MAX_DETECTION_ASPECT = 8


def rgb_float(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI image(s) [..., H, W, C] in 0..1 (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA) -> float32 RGB
    [..., H, W, 3] on the CPU, clamped to 0..1.

    Alpha is composited over black, the colour detectors pad with; grey is repeated into three channels.
    """
    if images.ndim < 3 or images.shape[-1] not in (1, 2, 3, 4):
        raise FaceAnalysisError(f"Expected an image [height, width, 1-4 channels], got shape {tuple(images.shape)}.")
    pixels = images.detach().to("cpu", torch.float32).clamp(0.0, 1.0)
    channels = pixels.shape[-1]
    colour = pixels[..., : 3 if channels >= 3 else 1]
    if channels in (2, 4):
        colour = colour * pixels[..., -1:]
    if colour.shape[-1] == 1:
        colour = colour.expand(*colour.shape[:-1], 3)
    return colour.contiguous()


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """Float RGB in 0..1 (from rgb_float) -> uint8 numpy, rounded."""
    return (rgb * 255.0).round().to(torch.uint8).numpy()


def rgb_uint8(image: torch.Tensor) -> np.ndarray:
    """One ComfyUI image [H, W, C] -> the uint8 RGB photo [H, W, 3] detectors take."""
    if image.ndim != 3:
        raise FaceAnalysisError(f"Expected an image [height, width, 1-4 channels], got shape {tuple(image.shape)}.")
    return to_uint8(rgb_float(image))


def rgb_photos(images: torch.Tensor, input_name: str) -> list[np.ndarray]:
    """A ComfyUI IMAGE batch (or one image) -> its uint8 RGB photos; any other shape is an error naming the input."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise IDFuseInputError(f"{input_name}: expected an IMAGE batch [images, height, width, channels], got shape "
                    f"{tuple(images.shape)}.")
    return [rgb_uint8(image) for image in images]


def detection_canvas(rgb: np.ndarray, min_side: int | None = None,
                     max_aspect: float | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """The photo as a detector should see it, and the (x, y) offset of the photo in it.

    A small photo is centred on a black square twice its longer side; a thin one gets black bands
    (centred) along its shorter side up to ``max_aspect``. Its longer side is unchanged, so the
    detector shrinks it by the same factor as before. Other photos are returned as they are.
    """
    min_side = SMALL_IMAGE_SIDE if min_side is None else min_side
    max_aspect = MAX_DETECTION_ASPECT if max_aspect is None else max_aspect
    height, width = rgb.shape[:2]
    longer = max(height, width)
    if longer < min_side:
        canvas_height = canvas_width = 2 * longer
    elif longer > max_aspect * min(height, width):
        shorter = math.ceil(longer / max_aspect)
        canvas_height, canvas_width = (height, shorter) if height > width else (shorter, width)
    else:
        return rgb, (0, 0)
    x, y = (canvas_width - width) // 2, (canvas_height - height) // 2
    canvas = np.zeros((canvas_height, canvas_width, 3), dtype=rgb.dtype)
    canvas[y:y + height, x:x + width] = rgb
    return canvas, (x, y)
