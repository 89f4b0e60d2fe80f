"""The layer sets an attention map averages over, by name (the node's ``layers`` choices)."""

from __future__ import annotations

from ..errors import IDFuseInputError
from ..training.settings import TrainingSettings
from ..unet import BlockKey, select_layers

# Downscale 4 is each family's mid resolution (SD1.5 16x16 and SDXL 32x32 grids at their native sizes):
# coarse enough that a word's attention is one region, fine enough to tell two faces apart.
MID_RESOLUTION = (4,)

LAYER_SETS: dict[str, tuple[int, ...] | None] = {
    "mid-resolution": MID_RESOLUTION,
    "trained layers": TrainingSettings().loss_downscales,  # where the trainer's attention loss acts
    "all": None,
}
DEFAULT_LAYER_SET = "mid-resolution"


def layers_of(family: str, layer_set: str) -> tuple[BlockKey, ...]:
    if layer_set not in LAYER_SETS:
        raise IDFuseInputError(f"layers '{layer_set}' is not one of {', '.join(LAYER_SETS)}; pick one of those.")
    return select_layers(family, LAYER_SETS[layer_set])
