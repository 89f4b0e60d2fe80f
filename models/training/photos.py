"""Photos, face masks and augmentation for training, in ComfyUI's layouts: IMAGE (P, H, W, C) in
[0, 1], MASK (M, H, W) with 1 = face. Plain torch."""

from __future__ import annotations

import logging

import torch
from torch.nn import functional as F

from ..errors import TrainingError
from ..faces.images import rgb_float

log = logging.getLogger("idfuse.training")

AUGMENTATIONS = ("flip", "flip + crop/scale", "crop/scale", "none")


def training_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """About resolution² pixels with the photo's aspect, sides multiples of 64 (the UNet halves 3 times
    after the VAE's factor 8)."""
    scale = resolution / (height * width) ** 0.5
    return (max(64, round(height * scale / 64) * 64), max(64, round(width * scale / 64) * 64))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, *size), antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x.clone()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def rgb_photos(images: torch.Tensor) -> torch.Tensor:
    """A checked IMAGE batch as RGB float on the CPU (P, H, W, 3), the pixels the face detectors see:
    alpha composited over black, grey expanded (the one conversion, in models/faces/images.py)."""
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 2, 3, 4):
        raise TrainingError(f"images: expected a batch of photos [count, height, width, channels], got shape "
                            f"{tuple(images.shape)}.")
    return rgb_float(images)


def prepare_photos(images: torch.Tensor, masks: torch.Tensor | None, resolution: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Photos at training size (P, H, W, 3) in [0, 1], and face masks (P, H, W) resized to them."""
    pixels = rgb_photos(images)
    count, height, width = pixels.shape[:3]
    size = training_size(height, width, resolution)
    photos = _resize(pixels.movedim(-1, 1), size).movedim(1, -1).clamp(0, 1).contiguous()
    if masks is None:
        return photos, None
    masks = masks.float().cpu()
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.ndim != 3 or masks.shape[0] not in (1, count):
        raise TrainingError(f"masks: {masks.shape[0] if masks.ndim == 3 else 'a'} mask(s) of shape "
                            f"{tuple(masks.shape)} for {count} photo(s); give one face mask per photo, or one for all.")
    for index, mask in enumerate(masks):
        if not bool((mask > 0.5).any()):
            raise TrainingError(f"masks: mask {index + 1} of {masks.shape[0]} is empty (no pixel above 0.5). Paint "
                                f"the face white (1) in every mask, or disconnect masks to detect faces.")
    if tuple(masks.shape[-2:]) != (height, width):
        log.info("masks are %dx%d, photos %dx%d; resizing the masks", masks.shape[-1],
                 masks.shape[-2], width, height)
    resized = _resize(masks.unsqueeze(1), size)[:, 0].clamp(0, 1)
    if bool((resized > 0.5).all()):
        log.warning("a face mask covers the whole photo; face_mask loss has no background to avoid.")
    return photos, resized.expand(count, -1, -1).contiguous()


def training_variants(photos: torch.Tensor, masks: torch.Tensor | None, augmentation: str, seed: int,
                      crops: int = 3) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The photos and their augmented copies, made once: (pixels, masks, index of each original)."""
    if augmentation not in AUGMENTATIONS:
        raise TrainingError(f"augmentation '{augmentation}' is not one of {', '.join(AUGMENTATIONS)}.")
    images = [photos]
    mask_sets = [masks]
    flip, crop = "flip" in augmentation, "crop" in augmentation
    if flip:
        images.append(photos.flip(2))
        mask_sets.append(None if masks is None else masks.flip(2))
    if crop:
        rng = torch.Generator().manual_seed(seed + 99)
        height, width = photos.shape[1:3]
        for _ in range(crops):
            for index in range(photos.shape[0]):
                scale = 0.75 + 0.25 * float(torch.rand((), generator=rng))
                h, w = max(8, round(height * scale)), max(8, round(width * scale))
                top = int(torch.randint(0, height - h + 1, (), generator=rng))
                left = int(torch.randint(0, width - w + 1, (), generator=rng))
                mirror = flip and bool(torch.rand((), generator=rng) < 0.5)
                image = _resize(photos[index:index + 1, top:top + h, left:left + w].movedim(-1, 1),
                                (height, width)).movedim(1, -1)
                images.append(image.flip(2) if mirror else image)
                if masks is not None:
                    mask = _resize(masks[index:index + 1, None, top:top + h, left:left + w], (height, width))[:, 0]
                    mask_sets.append(mask.flip(2) if mirror else mask)
    pixels = torch.cat(images).clamp(0, 1)
    all_masks = None if masks is None else torch.cat(mask_sets).clamp(0, 1)
    return pixels, all_masks, torch.arange(photos.shape[0])
