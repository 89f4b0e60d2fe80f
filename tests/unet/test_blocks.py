"""The block-key table matches the real topologies: every key is hit, no cross-attention is missed."""

from __future__ import annotations

import pytest
import torch
from factories import make_model, sample, sdxl_extras

from comfyui_idfuse.models.errors import ModelLayerNotFound
from comfyui_idfuse.models.unet import (
    FAMILIES,
    SD15_CROSS_ATTENTION,
    SDXL_CROSS_ATTENTION,
    BlockKey,
    block_keys,
    cross_attention_path,
    select_layers,
)


def test_table_sizes():
    assert len(SD15_CROSS_ATTENTION) == 16
    assert len(SDXL_CROSS_ATTENTION) == 70
    for keys in FAMILIES.values():
        assert len({k.key for k in keys}) == len(keys)
    assert all(k.key[1] == 0 for k in SD15_CROSS_ATTENTION if k.block == "middle")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_key_hit_and_no_layer_missed(family):
    from comfy.ldm.modules.attention import optimized_attention

    model = make_model(family).clone()
    replaced, seen, shapes = [], [], {}

    def recorder(key):
        def replace(q, k, v, extra_options):
            replaced.append(key)
            return optimized_attention(q, k, v, extra_options["n_heads"])
        return replace

    def observe(n, context, value, extra_options):
        key = (*extra_options["block"], extra_options["block_index"])
        seen.append(key)
        shapes[key] = n.shape[1]
        return n, context, value

    for layer in block_keys(family):
        model.set_model_attn2_replace(recorder(layer.key), *layer.key)
    model.set_model_attn2_patch(observe)
    cond = torch.randn(1, 77, 2048 if family == "sdxl" else 768)
    sample(model, [[cond, sdxl_extras(cond)]], [[cond * 0, sdxl_extras(cond)]], steps=1, size=32)

    table = {k.key for k in block_keys(family)}
    assert set(replaced) == table, "every registered key must be hit"
    assert set(seen) == table, "every cross-attention layer must be in the table"
    assert len(replaced) == len(seen)
    # The downscale recorded in the table is the layer's real grid: 32x32 latent -> (32/d)^2 tokens.
    for layer in block_keys(family):
        assert shapes[layer.key] == (32 // layer.downscale) ** 2, layer


def test_select_layers_by_resolution():
    mid = select_layers("sd15", (2, 4))
    assert len(mid) == 10 and all(k.downscale in (2, 4) for k in mid)
    assert select_layers("sd15") == SD15_CROSS_ATTENTION


@pytest.mark.parametrize("key", [BlockKey("input", 1, 3, 1), BlockKey("input", 40, 0, 1), BlockKey("input", 0, 0, 1)],
                         ids=str)
def test_a_layer_the_unet_lacks_is_a_clear_error(key):
    """A deeper transformer, a block past the end, a block without attention: the same error, naming the layer."""
    unet = make_model("sd15").model.diffusion_model
    with pytest.raises(ModelLayerNotFound, match=rf"no cross-attention layer {key}: .* Load an SD1.5 or SDXL"):
        cross_attention_path(unet, key)
