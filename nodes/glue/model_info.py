"""What family a ComfyUI MODEL or CLIP is, in terms of the pack's block table."""

from __future__ import annotations

from ...models.errors import UnsupportedModelError
from ...models.unet import block_keys, cross_attention_path, family_from_context_dim


def model_family(model) -> str:
    """'sd15' or 'sdxl' for a ModelPatcher, from its UNet's cross-attention width."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    return family_from_context_dim(config.get("context_dim"))


# ComfyUI tokenizer keys of each family's text encoders, and the names the pack uses for them.
TOKENIZER_KEYS = {"sd15": {"l": "clip_l"}, "sdxl": {"l": "clip_l", "g": "clip_g"}}


def clip_family(tokens: dict) -> str:
    keys = set(tokens)
    for family, names in TOKENIZER_KEYS.items():
        if keys == set(names):
            return family
    raise UnsupportedModelError(
        f"This CLIP has text encoders {sorted(keys)}; IDFuse supports the SD1.5 (clip_l) and SDXL "
        f"(clip_l + clip_g) text encoders. Load the CLIP of an SD1.5 or SDXL checkpoint.")


def cross_attention_widths(model) -> dict[tuple[str, int, int], int]:
    """Inner width of each cross-attention layer of a ComfyUI UNet, by block key."""
    unet = model.model.diffusion_model
    return {key.key: unet.get_submodule(cross_attention_path(unet, key)).to_k.out_features
            for key in block_keys(model_family(model))}
