"""Which UNet layer each attention processor of an IP-Adapter checkpoint belongs to.

IP-Adapter files number their weights by attention processor: ``N.to_k_ip.weight`` belongs to
the N-th entry of diffusers' ``UNet2DConditionModel.attn_processors`` (they were saved as
``nn.ModuleList(unet.attn_processors.values())``). That order is diffusers' module
registration order — down blocks, up blocks, then the middle block; attn1 (self-attention)
before attn2 (cross-attention) in each transformer — so it is read from diffusers itself
instead of being written down here: a UNet of the family's published configuration is built
on the meta device (no weights, well under a second) and each processor name is mapped onto
the pack's block keys (``models.unet``, the one table of layers).

diffusers is imported on first use only: importing it takes seconds.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import torch

from ..errors import IDEncoderError
from ..unet import BlockKey, block_keys

# The families' published UNet configurations (unet/config.json of runwayml/stable-diffusion-v1-5
# and stabilityai/stable-diffusion-xl-base-1.0), reduced to what shapes the module tree.
DIFFUSERS_UNET_CONFIGS: dict[str, dict] = {
    "sd15": {
        "sample_size": 64,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    "sdxl": {
        "sample_size": 128,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}

SELF_ATTENTION, CROSS_ATTENTION = "attn1", "attn2"

_PROCESSOR_NAME = re.compile(
    r"^(?P<part>down_blocks|up_blocks|mid_block)\.(?:(?P<level>\d+)\.)?attentions\.(?P<position>\d+)"
    r"\.transformer_blocks\.(?P<index>\d+)\.(?P<kind>attn[12])\.processor$")


class Processor(NamedTuple):
    number: int  # N in the checkpoint's "N.to_k_ip.weight"
    name: str  # diffusers' processor name
    layer: BlockKey  # the ComfyUI transformer it sits in
    attention: str  # SELF_ATTENTION or CROSS_ATTENTION
    hidden_size: int  # the layer's channel width in the full-size UNet

    @property
    def is_cross_attention(self) -> bool:
        return self.attention == CROSS_ATTENTION


def _comfy_layer_key(name: str, layers_per_block: int) -> tuple[tuple[str, int, int], str]:
    """ComfyUI's (block, block_id, index) and attn1/attn2 of a diffusers processor name.

    ComfyUI's input_blocks[0] is conv_in, then each level has ``layers_per_block`` blocks plus
    a downsampler; each output level has ``layers_per_block + 1`` blocks.
    """
    match = _PROCESSOR_NAME.match(name)
    if match is None:
        raise IDEncoderError(f"Unexpected diffusers attention processor name {name!r} (a diffusers version this "
                             f"IDFuse does not know); update processor_order.py.")
    position, index = int(match["position"]), int(match["index"])
    if match["part"] == "mid_block":
        return ("middle", 0, index), match["kind"]
    level = int(match["level"])
    if match["part"] == "down_blocks":
        return ("input", 1 + level * (layers_per_block + 1) + position, index), match["kind"]
    return ("output", level * (layers_per_block + 1) + position, index), match["kind"]


@functools.cache
def processors(family: str) -> tuple[Processor, ...]:
    """Every attention processor of the family's UNet, in IP-Adapter checkpoint order."""
    try:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    except ImportError as e:
        raise IDEncoderError("Reading IP-Adapter checkpoints needs the diffusers package (its processor order "
                             "numbers the weights): pip install -r requirements.txt") from e

    config = DIFFUSERS_UNET_CONFIGS[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    layers = {k.key: k for k in block_keys(family)}
    found = []
    for number, name in enumerate(unet.attn_processors):
        key, attention = _comfy_layer_key(name, config["layers_per_block"])
        if key not in layers:
            raise IDEncoderError(f"diffusers' {family} UNet has attention {name!r} at {key}, which is not in the "
                                 f"block table of models/unet.py; update processor_order.py.")
        module = unet.get_submodule(name.removesuffix(".processor"))
        found.append(Processor(number, name, layers[key], attention, module.to_q.in_features))
    return tuple(found)


def cross_attention_processors(family: str) -> tuple[Processor, ...]:
    """The attn2 processors: the ones holding to_k_ip / to_v_ip, one per cross-attention layer."""
    return tuple(p for p in processors(family) if p.is_cross_attention)


def comfy_attention_weight(layer: BlockKey, attention: str, projection: str) -> str:
    """ComfyUI's UNet weight name of a projection ("to_q", "to_k", "to_v", "to_out.0") of a layer.

    The SpatialTransformer is submodule 1 of its input/output block and of the middle block.
    """
    block = "middle_block" if layer.block == "middle" else f"{layer.block}_blocks.{layer.block_id}"
    return f"diffusion_model.{block}.1.transformer_blocks.{layer.index}.{attention}.{projection}.weight"
