"""The trainer's LoRA: which UNet layers it adapts (from the block table) and its file, in the
kohya / ComfyUI key format that ComfyUI's own LoraLoader reads:

    lora_unet_<module path with _>.lora_down.weight  (rank, in)
    lora_unet_<module path with _>.lora_up.weight    (out, rank)
    lora_unet_<module path with _>.alpha             ()  -> weight += up @ down * alpha / rank
"""

from __future__ import annotations

import os

import comfy.lora
import comfy.sd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..models.attention_loss import cross_attention_path
from ..models.blocks import block_keys
from ..models.generator import LoRAAdapter
from ..models.id_tokens import atomic_save_safetensors

# UI choice -> projections of each cross-attention layer (module names inside attn2).
LORA_TARGET_CHOICES: dict[str, tuple[str, ...]] = {
    "to_k, to_v": ("to_k", "to_v"),
    "to_q, to_k, to_v": ("to_q", "to_k", "to_v"),
    "to_q, to_k, to_v, to_out": ("to_q", "to_k", "to_v", "to_out"),
}
_PROJECTION_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


class LoRAFileError(ValueError):
    pass


def lora_key(module_path: str) -> str:
    return "lora_unet_" + module_path.replace(".", "_")


def lora_layers(model, family: str, targets: tuple[str, ...]) -> dict[str, tuple[str, nn.Linear]]:
    """LoRA key -> (module path inside the UNet, the Linear) for every cross-attention layer.

    The keys are checked against ComfyUI's own LoRA key map, so a saved file loads in LoraLoader.
    """
    unet = model.model.diffusion_model
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    layers = {}
    for block in block_keys(family):
        attention = cross_attention_path(unet, block)
        for target in targets:
            path = f"{attention}.{_PROJECTION_MODULES[target]}"
            key = lora_key(path)
            if key_map.get(key) != f"diffusion_model.{path}.weight":
                raise LoRAFileError(f"ComfyUI does not map the LoRA key {key} to {path}; this ComfyUI version names "
                                    f"LoRA layers differently. Use lora_rank 0 (tokens only).")
            layers[key] = (path, unet.get_submodule(path))
    return layers


def new_adapters(layers: dict[str, tuple[str, nn.Linear]], rank: int, seed: int) -> nn.ModuleDict:
    rng = torch.Generator().manual_seed(seed + 7)
    return nn.ModuleDict({key: LoRAAdapter(layer.in_features, layer.out_features, rank, generator=rng)
                          for key, (_path, layer) in sorted(layers.items())})


def lora_state_dict(adapters: nn.ModuleDict) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, adapter in adapters.items():
        tensors[f"{key}.lora_down.weight"] = adapter.down.detach().float().cpu().contiguous()
        tensors[f"{key}.lora_up.weight"] = adapter.up.detach().float().cpu().contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(adapter.alpha)
    return tensors


def save_lora(adapters: nn.ModuleDict, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    rank = next(iter(adapters.values())).rank
    atomic_save_safetensors(lora_state_dict(adapters), path, {
        **metadata, "ss_network_dim": str(rank), "ss_network_alpha": str(next(iter(adapters.values())).alpha)})


def load_adapters(path: str | os.PathLike, layers: dict[str, tuple[str, nn.Linear]], rank: int) -> nn.ModuleDict:
    """Adapters for ``layers`` with the weights of a LoRA file this trainer saved (to resume)."""
    name = os.path.basename(str(path))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LoRAFileError(f"LoRA {name}: not a readable safetensors file ({e}).") from e
    adapters = new_adapters(layers, rank, seed=0)
    for key, adapter in adapters.items():
        down, up = tensors.get(f"{key}.lora_down.weight"), tensors.get(f"{key}.lora_up.weight")
        if down is None or up is None:
            raise LoRAFileError(f"LoRA {name} has no weights for {key}: it was trained with other lora_targets. "
                                f"Set lora_targets as in the run being resumed.")
        if down.shape != adapter.down.shape or up.shape != adapter.up.shape:
            raise LoRAFileError(f"LoRA {name} has rank {down.shape[0]}, the trainer is set to rank {rank}. "
                                f"Set lora_rank to {down.shape[0]} to resume it.")
        with torch.no_grad():
            adapter.down.copy_(down)
            adapter.up.copy_(up)
        adapter.alpha = float(tensors.get(f"{key}.alpha", torch.tensor(float(rank))))
    return adapters


def model_with_lora(model, lora: dict[str, torch.Tensor], strength: float = 1.0):
    """A clone of ``model`` with the LoRA added as ComfyUI weight patches, as LoraLoader does."""
    patched, _clip = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    return patched
