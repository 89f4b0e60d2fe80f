"""The UNet cross-attention layers of each supported model family: the one table the pack uses.

A key is ComfyUI's ``(block_name, block_id, transformer_index)``, the tuple it looks up in
``patches_replace`` and passes to patches as ``extra_options["block"]`` +
``extra_options["block_index"]``. The middle block is ``("middle", 0, i)``.
``downscale`` is the factor between the latent and that layer's grid (1 = full latent
resolution), so a 512x512 SD1.5 image (64x64 latent) has 16x16 layers at downscale 4.
"""

from __future__ import annotations

from typing import NamedTuple


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


class UnsupportedModelError(ValueError):
    pass


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
