"""The trainer's LoRA: the UNet layers it adapts (from the block table) and its file.

The file uses the kohya key format that ComfyUI's own LoraLoader reads, with kohya sd-scripts' names
(nodes/glue/lora.py, shared with the ID-encoder LoRA: SDXL after the original modules, SD1.5 after
diffusers'):

    <kohya name>.lora_down.weight  (rank, in)
    <kohya name>.lora_up.weight    (out, rank)
    <kohya name>.alpha             ()  -> weight += up @ down * alpha / rank

SDXL files of earlier versions used diffusers' names; resuming from one still works.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ...models.errors import LoRAFileError
from ...models.files import atomic_save_safetensors, read_safetensors
from ...models.training.lora import LoRAAdapter
from ...models.unet import block_keys, cross_attention_path
from .lora import as_kohya_state_dict, former_kohya_names, kohya_names, with_lora

# UI choice -> projections of each cross-attention layer (module names inside attn2).
LORA_TARGET_CHOICES: dict[str, tuple[str, ...]] = {
    "to_k, to_v": ("to_k", "to_v"),
    "to_q, to_k, to_v": ("to_q", "to_k", "to_v"),
    "to_q, to_k, to_v, to_out": ("to_q", "to_k", "to_v", "to_out"),
}
_PROJECTION_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


class LoRALayers(dict[str, tuple[str, nn.Linear]]):
    """kohya name -> (UNet weight key, the Linear); ``former_names`` gives each kohya name the name earlier
    versions wrote (the same for SD1.5), to resume their files."""

    def __init__(self, layers: dict[str, tuple[str, nn.Linear]], former_names: dict[str, str]):
        super().__init__(layers)
        self.former_names = former_names


def lora_layers(model, family: str, targets: tuple[str, ...]) -> LoRALayers:
    """The targets of every cross-attention layer, by kohya name."""
    unet = model.model.diffusion_model
    names, former = kohya_names(model), former_kohya_names(model)
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
    return LoRALayers(layers, {name: former[key] for name, (key, _layer) in layers.items()})


def new_adapters(layers: dict[str, tuple[str, nn.Linear]], rank: int, seed: int) -> nn.ModuleDict:
    # Made in name order: a seed's initial weights and a resumed optimiser state (kept by parameter position)
    # depend on it. SDXL's kohya names sort like its former (diffusers) names, so both stay as they were.
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


def load_adapters(path: str | os.PathLike, layers: LoRALayers, rank: int) -> nn.ModuleDict:
    """Adapters for ``layers`` with the weights of a LoRA file this trainer saved (to resume), under its
    kohya names or the former ones."""
    name = os.path.basename(str(path))
    tensors, _metadata = read_safetensors(path, LoRAFileError, "LoRA")
    adapters = new_adapters(layers, rank, seed=0)
    for key, adapter in adapters.items():
        stored = key if f"{key}.lora_down.weight" in tensors else layers.former_names[key]
        down, up = tensors.get(f"{stored}.lora_down.weight"), tensors.get(f"{stored}.lora_up.weight")
        if down is None or up is None:
            raise LoRAFileError(f"LoRA {name} has no weights for {key}: it was trained with other lora_targets. "
                                f"Set lora_targets as in the run being resumed.")
        if down.shape != adapter.down.shape or up.shape != adapter.up.shape:
            raise LoRAFileError(f"LoRA {name} has rank {down.shape[0]}, the trainer is set to rank {rank}. "
                                f"Set lora_rank to {down.shape[0]} to resume it.")
        with torch.no_grad():
            adapter.down.copy_(down)
            adapter.up.copy_(up)
        adapter.alpha = float(tensors.get(f"{stored}.alpha", torch.tensor(float(rank))))
    return adapters


def model_with_lora(model, adapters: nn.ModuleDict, layers: dict[str, tuple[str, nn.Linear]], strength: float = 1.0):
    """A clone of ``model`` with the trained LoRA as ComfyUI weight patches, as LoraLoader adds them."""
    return with_lora(model, lora_weights(adapters, layers), strength)
