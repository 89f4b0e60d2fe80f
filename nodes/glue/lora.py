"""LoRA weights given per UNet weight, applied through ComfyUI's own LoRA loading."""

from __future__ import annotations

from collections.abc import Mapping

import comfy.lora
import torch

from ...models.errors import LoRAFileError


def kohya_names(model) -> dict[str, str]:
    """UNet weight key ("diffusion_model.….weight") -> its kohya LoRA name ("lora_unet_…")."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    return {weight: name for name, weight in key_map.items()
            if isinstance(weight, str) and name.startswith("lora_unet_")}


def as_kohya_state_dict(model, lora: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{weight key: {"down", "up"[, "alpha"]}} -> the key format ComfyUI's LoraLoader reads."""
    names = kohya_names(model)
    missing = [key for key in lora if key not in names]
    if missing:
        raise LoRAFileError(f"The LoRA targets {len(missing)} weights this model does not have (e.g. {missing[:3]}); "
                            f"it was made for another model. Use a LoRA of this model's family.")
    out = {}
    for key, parts in lora.items():
        name = names[key]
        out[f"{name}.lora_down.weight"] = parts["down"]
        out[f"{name}.lora_up.weight"] = parts["up"]
        if "alpha" in parts:
            out[f"{name}.alpha"] = torch.as_tensor(parts["alpha"])
    return out


def with_lora(model, lora: Mapping[str, Mapping[str, torch.Tensor]], strength: float):
    """A clone of ``model`` with the LoRA added as weight patches (the input is not changed)."""
    patched = model.clone()
    if strength == 0.0 or not lora:
        return patched
    state_dict = as_kohya_state_dict(model, lora)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(state_dict, key_map)
    applied = patched.add_patches(patches, strength)
    if len(applied) != len(lora):
        raise LoRAFileError(f"Only {len(applied)} of {len(lora)} LoRA weights could be applied to this model; the "
                            f"LoRA was made for another model. Use a LoRA of this model's family.")
    return patched
