"""LoRA key names: kohya sd-scripts' convention for both families (SDXL after the original SGM modules,
SD1.5 after diffusers' modules), files ComfyUI's own loader applies completely, and SDXL files of earlier
versions (diffusers names) still resume."""

from __future__ import annotations

import pytest
import torch
from factories import make_model

from comfyui_idfuse.nodes.glue.lora import kohya_names
from comfyui_idfuse.nodes.glue.lora_files import (
    LORA_TARGET_CHOICES,
    load_adapters,
    lora_layers,
    new_adapters,
    save_lora,
)

ALL_TARGETS = LORA_TARGET_CHOICES["to_q, to_k, to_v, to_out"]

# Written out by hand from the two conventions: sd-scripts names a module "lora_unet_" + its module path in
# sd-scripts' own UNet with "_" for ".": for SDXL that UNet keeps the original modules (input_blocks,
# middle_block, output_blocks), for SD1.5 it has diffusers' (down_blocks.N.attentions.M, mid_block, up_blocks).
EXPECTED = {
    "sdxl": {
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
        "input_blocks.8.1.transformer_blocks.9.attn2.to_v": "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_v",
        "middle_block.1.transformer_blocks.3.attn2.to_q": "lora_unet_middle_block_1_transformer_blocks_3_attn2_to_q",
        "output_blocks.0.1.transformer_blocks.0.attn2.to_out.0":
            "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_out_0",
        "output_blocks.5.1.transformer_blocks.1.attn2.to_k": "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_k",
    },
    "sd15": {
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "input_blocks.5.1.transformer_blocks.0.attn2.to_v": "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_v",
        "middle_block.1.transformer_blocks.0.attn2.to_q": "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q",
        "output_blocks.3.1.transformer_blocks.0.attn2.to_out.0":
            "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "output_blocks.11.1.transformer_blocks.0.attn2.to_k": "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k",
    },
}
# What earlier versions wrote for SDXL (ComfyUI's diffusers names), for the resume test.
FORMER_SDXL = {"input_blocks.4.1.transformer_blocks.0.attn2.to_k":
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"}


@pytest.fixture(scope="module")
def models():
    return {"sd15": make_model("sd15"), "sdxl": make_model("sdxl")}


def _trained_adapters(layers, rank=2, seed=3):
    adapters = new_adapters(layers, rank, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.up.copy_(torch.randn(adapter.up.shape, generator=gen))  # up starts at zero: make it count
    return adapters


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_names_follow_kohyas_convention(models, family):
    model = models[family]
    names = kohya_names(model)
    layers = lora_layers(model, family, ALL_TARGETS)
    for path, expected in EXPECTED[family].items():
        weight = f"diffusion_model.{path}.weight"
        assert names[weight] == expected
        assert layers[expected][0] == weight
    prefix = {"sdxl": ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"),
              "sd15": ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")}[family]
    assert all(name.startswith(prefix) for name in layers)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_comfys_lora_loader_applies_every_weight_of_a_saved_file(models, family, tmp_path):
    import comfy.lora
    import comfy.utils

    model = models[family]
    layers = lora_layers(model, family, ALL_TARGETS)
    adapters = _trained_adapters(layers)
    path = tmp_path / f"{family}.safetensors"
    save_lora(model, adapters, layers, path, {"format": "idfuse.lora"})
    state = comfy.utils.load_torch_file(str(path))
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state} == set(layers)

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})  # as LoraLoader builds it (UNet part)
    patches = comfy.lora.load_lora(state, key_map)
    assert set(patches) == {weight for weight, _layer in layers.values()}
    applied = model.clone().add_patches(patches, 1.0)
    assert len(applied) == len(layers)
    # Each patch is the file's up @ down at its layer: the names point at the weights they were trained for.
    original = model.model.state_dict()
    for name, (weight, _layer) in layers.items():
        up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
        assert (up @ down).shape == original[weight].shape


def test_sdxl_file_with_the_former_names_resumes(models, tmp_path):
    model = models["sdxl"]
    layers = lora_layers(model, "sdxl", ALL_TARGETS)
    path = tmp_path / "new.safetensors"
    adapters = _trained_adapters(layers)
    save_lora(model, adapters, layers, path, {"format": "idfuse.lora"})

    from comfyui_idfuse.models.errors import LoRAFileError
    from comfyui_idfuse.models.files import atomic_save_safetensors, read_safetensors

    tensors, _ = read_safetensors(path, LoRAFileError, "LoRA")
    former = {}
    for key, value in tensors.items():
        name, part = key.split(".", 1)
        former[f"{layers.former_names[name]}.{part}"] = value
    path_for_first = f"diffusion_model.{next(iter(FORMER_SDXL))}.weight"
    first_name = next(n for n, (w, _l) in layers.items() if w == path_for_first)
    assert layers.former_names[first_name] == next(iter(FORMER_SDXL.values()))
    old_path = tmp_path / "old.safetensors"
    atomic_save_safetensors(former, old_path, {"format": "idfuse.lora"})
    assert not set(former) & set(tensors)  # really the other names

    for source in (path, old_path):
        loaded = load_adapters(source, layers, rank=2)
        assert list(loaded) == list(adapters)
        for name, adapter in adapters.items():
            assert torch.equal(loaded[name].down, adapter.down) and torch.equal(loaded[name].up, adapter.up)
            assert loaded[name].alpha == adapter.alpha


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_adapters_keep_the_former_order(models, family):
    """A seed makes the same adapters as before the renaming, and a resumed run's optimiser state (kept by
    parameter position) meets the same layers: the adapters' order (the names') is the former names' order."""
    layers = lora_layers(models[family], family, ALL_TARGETS)
    adapters = new_adapters(layers, 2, seed=0)
    assert list(adapters) == sorted(layers, key=layers.former_names.__getitem__)
    renamed = [name for name, former in layers.former_names.items() if name != former]
    assert (len(renamed) == len(layers)) if family == "sdxl" else not renamed
