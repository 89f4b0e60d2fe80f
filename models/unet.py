"""The UNet as the pack sees it: the cross-attention layers of each family (the one block-key table),
the denoising-time stages, and where each layer sits in a model (module path, token grid).

A key is ComfyUI's ``(block_name, block_id, transformer_index)``, the tuple it looks up in
``patches_replace`` and passes to patches as ``extra_options["block"]`` +
``extra_options["block_index"]``. The middle block is ``("middle", 0, i)``.
``downscale`` is the factor between the latent and that layer's grid (1 = full latent
resolution), so a 512x512 SD1.5 image (64x64 latent) has 16x16 layers at downscale 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ModelLayerNotFound, UnsupportedModelError


class BlockKey(NamedTuple):
    block: str
    block_id: int
    index: int
    downscale: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.block, self.block_id, self.index)

    def __str__(self) -> str:
        return f"{self.block}.{self.block_id}.{self.index}"


def _layers(block: str, block_ids: tuple[int, ...], depth: int, downscale: int) -> tuple[BlockKey, ...]:
    return tuple(BlockKey(block, i, j, downscale) for i in block_ids for j in range(depth))


# SD1.x: one transformer per attention block, attention at downscales 1, 2, 4 and 8 (middle).
SD15_CROSS_ATTENTION: tuple[BlockKey, ...] = (
    _layers("input", (1, 2), 1, 1)
    + _layers("input", (4, 5), 1, 2)
    + _layers("input", (7, 8), 1, 4)
    + _layers("middle", (0,), 1, 8)
    + _layers("output", (3, 4, 5), 1, 4)
    + _layers("output", (6, 7, 8), 1, 2)
    + _layers("output", (9, 10, 11), 1, 1)
)

# SDXL: no attention at full resolution; 2 transformers per block at downscale 2, 10 at 4.
SDXL_CROSS_ATTENTION: tuple[BlockKey, ...] = (
    _layers("input", (4, 5), 2, 2)
    + _layers("input", (7, 8), 10, 4)
    + _layers("middle", (0,), 10, 4)
    + _layers("output", (0, 1, 2), 10, 4)
    + _layers("output", (3, 4, 5), 2, 2)
)

FAMILIES: dict[str, tuple[BlockKey, ...]] = {"sd15": SD15_CROSS_ATTENTION, "sdxl": SDXL_CROSS_ATTENTION}

# Width of the UNet's cross-attention context, which tells the families apart.
CONTEXT_DIM: dict[str, int] = {"sd15": 768, "sdxl": 2048}

FAMILY_NAMES: dict[str, str] = {"sd15": "SD1.5", "sdxl": "SDXL"}


def family_from_context_dim(context_dim: int | None) -> str:
    for family, dim in CONTEXT_DIM.items():
        if dim == context_dim:
            return family
    raise UnsupportedModelError(
        f"This model's cross-attention context is {context_dim}-wide; IDFuse supports SD1.5 (768) "
        f"and SDXL (2048) models. Load an SD1.5 or SDXL checkpoint."
    )


def block_keys(family: str) -> tuple[BlockKey, ...]:
    return FAMILIES[family]


def select_layers(family: str, downscales: tuple[int, ...] | None = None) -> tuple[BlockKey, ...]:
    """The family's cross-attention layers at the given downscales (all when None)."""
    return tuple(k for k in FAMILIES[family] if downscales is None or k.downscale in downscales)


# --- stages (SeFi-IDE / ProSpect): stage i covers t in [1000 i/S, 1000 (i+1)/S) ---

NUM_TRAIN_TIMESTEPS = 1000


def stage_of_timestep(timestep: torch.Tensor | float, num_stages: int,
                      num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Zero-based stage index of each timestep on the training schedule (0 = least noise)."""
    t = torch.as_tensor(timestep, dtype=torch.float64)
    stage = torch.floor(t * num_stages / num_train_timesteps).long()
    return stage.clamp_(0, num_stages - 1)


# --- where a layer sits in a ComfyUI UNet ---

_BLOCK_ATTRIBUTES = {"input": "input_blocks", "middle": "middle_block", "output": "output_blocks"}


def cross_attention_path(diffusion_model: nn.Module, key: BlockKey) -> str:
    """Module path (inside the UNet) of the cross-attention at a block-table key, e.g.
    ``input_blocks.1.1.transformer_blocks.0.attn2``. The spatial transformer's place inside its
    block is looked up, not assumed."""
    attribute = _BLOCK_ATTRIBUTES[key.block]
    container = getattr(diffusion_model, attribute, None)
    if key.block == "middle" or container is None:
        block = container
    else:
        block = container[key.block_id] if key.block_id < len(container) else None
    prefix = attribute if key.block == "middle" else f"{attribute}.{key.block_id}"
    for position, child in enumerate(() if block is None else block):
        if hasattr(child, "transformer_blocks"):
            if key.index >= len(child.transformer_blocks):
                break
            return f"{prefix}.{position}.transformer_blocks.{key.index}.attn2"
    raise ModelLayerNotFound(f"The UNet has no cross-attention layer {key}: its layout is not a standard SD1.5 or SDXL "
                             f"UNet. Load an SD1.5 or SDXL checkpoint.")


def layer_grid(latent_hw: Sequence[int], downscale: int) -> tuple[int, int]:
    """A layer's token grid: the UNet halves the latent (rounding up) once per factor of two."""
    height, width = int(latent_hw[0]), int(latent_hw[1])
    factor = downscale
    while factor > 1:
        height, width, factor = (height + 1) // 2, (width + 1) // 2, factor // 2
    return height, width


def masks_on_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) masks in [0, 1] -> (B, h*w): the share of each cell of a layer's token grid that the mask covers
    (area average). The one mask-on-grid resize of the pack: face-mask losses, token regions, regional Infinite-ID."""
    return F.adaptive_avg_pool2d(masks.unsqueeze(1).float(), grid).flatten(1)
