"""The trainer's LoRA: the UNet layers it adapts (from the block table) and its file.

The file uses the kohya key format that ComfyUI's own LoraLoader reads, with the names ComfyUI's
key map gives (through nodes/glue/lora.py, shared with the ID-encoder LoRA):

    <kohya name>.lora_down.weight  (rank, in)
    <kohya name>.lora_up.weight    (out, rank)
    <kohya name>.alpha             ()  -> weight += up @ down * alpha / rank
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ...models.errors import LoRAFileError
from ...models.files import atomic_save_safetensors, read_safetensors
from ...models.training.lora import LoRAAdapter
from ...models.unet import block_keys, cross_attention_path
from .lora import as_kohya_state_dict, kohya_names, with_lora

# UI choice -> projections of each cross-attention layer (module names inside attn2).
LORA_TARGET_CHOICES: dict[str, tuple[str, ...]] = {
    "to_k, to_v": ("to_k", "to_v"),
    "to_q, to_k, to_v": ("to_q", "to_k", "to_v"),
    "to_q, to_k, to_v, to_out": ("to_q", "to_k", "to_v", "to_out"),
}
_PROJECTION_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def lora_layers(model, family: str, targets: tuple[str, ...]) -> dict[str, tuple[str, nn.Linear]]:
    """kohya name -> (UNet weight key, the Linear) for the targets of every cross-attention layer."""
    unet = model.model.diffusion_model
    names = kohya_names(model)
    layers = {}
    for block in block_keys(family):
        attention = cross_attention_path(unet, block)
        for target in targets:
            path = f"{attention}.{_PROJECTION_MODULES[target]}"
            weight_key = f"diffusion_model.{path}.weight"
            if weight_key not in names:
                raise LoRAFileError(f"ComfyUI has no LoRA name for {weight_key}; this ComfyUI version names LoRA "
                                    f"layers differently. Use lora_rank 0 (tokens only).")
            layers[names[weight_key]] = (weight_key, unet.get_submodule(path))
    return layers


def new_adapters(layers: dict[str, tuple[str, nn.Linear]], rank: int, seed: int) -> nn.ModuleDict:
    rng = torch.Generator().manual_seed(seed + 7)
    return nn.ModuleDict({name: LoRAAdapter(layer.in_features, layer.out_features, rank, generator=rng)
                          for name, (_key, layer) in sorted(layers.items())})


def lora_weights(adapters: nn.ModuleDict, layers: dict[str, tuple[str, nn.Linear]]) -> dict[str, dict[str, torch.Tensor]]:
    """{UNet weight key: {"down", "up", "alpha"}}, the form nodes/glue/lora.py takes."""
    return {layers[name][0]: {"down": adapter.down.detach().float().cpu().contiguous(),
                              "up": adapter.up.detach().float().cpu().contiguous(),
                              "alpha": torch.tensor(adapter.alpha)}
            for name, adapter in adapters.items()}


def save_lora(model, adapters: nn.ModuleDict, layers: dict[str, tuple[str, nn.Linear]],
              path: str | os.PathLike, metadata: dict[str, str]) -> None:
    first = next(iter(adapters.values()))
    tensors = as_kohya_state_dict(model, lora_weights(adapters, layers))
    atomic_save_safetensors(tensors, path, {**metadata, "ss_network_dim": str(first.rank),
                                            "ss_network_alpha": str(first.alpha)})


def load_adapters(path: str | os.PathLike, layers: dict[str, tuple[str, nn.Linear]], rank: int) -> nn.ModuleDict:
    """Adapters for ``layers`` with the weights of a LoRA file this trainer saved (to resume)."""
    name = os.path.basename(str(path))
    tensors, _metadata = read_safetensors(path, LoRAFileError, "LoRA")
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


def model_with_lora(model, adapters: nn.ModuleDict, layers: dict[str, tuple[str, nn.Linear]], strength: float = 1.0):
    """A clone of ``model`` with the trained LoRA as ComfyUI weight patches, as LoraLoader adds them."""
    return with_lora(model, lora_weights(adapters, layers), strength)
