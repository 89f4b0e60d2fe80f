"""The Infinite-ID inference settings shared by the Guider and the Sampler node."""

from __future__ import annotations

from dataclasses import dataclass

# Which UNet parts use mixed self-attention.
MIX_BLOCKS: dict[str, tuple[str, ...]] = {
    "all": ("input", "middle", "output"),
    "middle+output": ("middle", "output"),
    "output": ("output",),
    "input": ("input",),
    "middle": ("middle",),
}


@dataclass(frozen=True)
class InfiniteIDSettings:
    id_weight: float = 1.0
    id_start: float = 0.0
    id_end: float = 1.0
    mixing: bool = True
    mix_blocks: str = "all"
    mix_start: float = 0.0
    mix_end: float = 1.0
    adain: str = "mean"
    lora_strength: float = 0.0
    shortcut_scale: float = 1.0  # FaceID-PlusV2's s_scale: weight of the CLIP branch added to the face tokens
