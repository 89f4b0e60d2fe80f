"""LoRA weights given per UNet weight, applied through ComfyUI's own LoRA loading."""

from __future__ import annotations

from collections.abc import Mapping

import comfy.lora
import torch

from ...models.errors import LoRAFileError
from .model_info import model_family

KOHYA_PREFIX = "lora_unet_"


def original_module_name(weight_key: str) -> str:
    """kohya name of a UNet weight after its original (SGM) module path: "diffusion_model.input_blocks.4.1.….weight"
    -> "lora_unet_input_blocks_4_1_…"."""
    path = weight_key.removeprefix("diffusion_model.").removesuffix(".weight")
    return KOHYA_PREFIX + path.replace(".", "_")


def _key_map_names(model) -> dict[str, list[str]]:
    """UNet weight key -> every "lora_unet_…" name ComfyUI's LoRA loader maps to it, in the key map's order."""
    names: dict[str, list[str]] = {}
    for name, weight in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        if isinstance(weight, str) and name.startswith(KOHYA_PREFIX):
            names.setdefault(weight, []).append(name)
    return names


def kohya_names(model) -> dict[str, str]:
    """UNet weight key ("diffusion_model.….weight") -> its name in kohya sd-scripts' convention, which ComfyUI's
    LoRA loader also reads: SDXL after the original (SGM) modules ("lora_unet_input_blocks_4_1_…", as sd-scripts'
    SDXL UNet names them), SD1.5 after diffusers' modules ("lora_unet_down_blocks_1_attentions_0_…")."""
    original = model_family(model) == "sdxl"
    out = {}
    for weight, names in _key_map_names(model).items():
        sgm = original_module_name(weight)
        diffusers = [n for n in names if n != sgm]
        out[weight] = sgm if original or not diffusers else diffusers[-1]
    return out


def former_kohya_names(model) -> dict[str, str]:
    """UNet weight key -> the name earlier versions of the pack wrote for it (ComfyUI's last listed name: the
    diffusers one where there is one), so that their files still load."""
    return {weight: names[-1] for weight, names in _key_map_names(model).items()}


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
