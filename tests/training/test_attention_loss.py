"""Attention probes and losses: explicit attention equals ComfyUI's, every probe layer is hit, the
layer grids and module paths fit the real UNet topologies, the face losses point the right way."""

from __future__ import annotations

import pytest
import torch
from factories import make_model

from comfyui_idfuse.models.training.losses import attention_loss, face_mask_loss
from comfyui_idfuse.models.training.probes import (
    AttentionProbes,
    LayerRecord,
    ProbeBatch,
    explicit_attention,
    face_share,
)
from comfyui_idfuse.models.unet import BlockKey, block_keys, cross_attention_path, layer_grid, select_layers


@pytest.fixture(scope="module")
def sd15():
    return make_model("sd15")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_block_key_has_a_cross_attention_module(family, sd15):
    model = sd15 if family == "sd15" else make_model("sdxl")
    unet = model.model.diffusion_model
    paths = [cross_attention_path(unet, key) for key in block_keys(family)]
    assert len(set(paths)) == len(paths)
    for path in paths:
        module = unet.get_submodule(path)
        assert path.endswith(".attn2") and hasattr(module, "to_k")
    with pytest.raises(LookupError):
        cross_attention_path(unet, BlockKey("input", 1, 7, 1))


def test_layer_grid_rounds_up_like_the_unet():
    assert layer_grid((64, 64), 4) == (16, 16)
    assert layer_grid((15, 9), 4) == (4, 3)
    assert layer_grid((15, 9), 1) == (15, 9)


def _forward(model, probes=None, batch=None, size=(16, 24)):
    from comfy.ldm.modules.attention import optimized_attention  # noqa: F401  (the probes' fallback)

    patched = model.clone()
    if probes is not None:
        for key in probes.keys:
            patched.set_model_attn2_replace(probes.replace_patch(key), *key.key)
        probes.begin(batch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, *size, generator=gen)
    context = torch.randn(1, 77, 768, generator=gen)
    options = dict(patched.model_options.get("transformer_options", {}))
    with torch.no_grad():
        out = patched.model.apply_model(x, torch.tensor([3.0]), c_crossattn=context, transformer_options=options)
    records = probes.collected() if probes is not None else None
    return out, records


def test_probes_compute_the_same_layer_output_and_hit_every_layer(sd15):
    from comfy.ldm.modules.attention import optimized_attention

    unet = sd15.model.diffusion_model
    layers = select_layers("sd15")
    to_k = {key: unet.get_submodule(cross_attention_path(unet, key)).to_k for key in layers}
    probes = AttentionProbes(to_k, optimized_attention)
    reference, _ = _forward(sd15)
    probed, records = _forward(sd15, probes, ProbeBatch(torch.tensor([5])))
    torch.testing.assert_close(probed, reference, rtol=1e-4, atol=1e-5)
    assert [r.key for r in records] == list(layers)  # every probe hit once, in UNet order
    for record in records:
        grid = layer_grid((16, 24), record.key.downscale)
        assert record.grid == grid and record.target.shape == (1, grid[0] * grid[1])
        assert bool((record.target > 0).all()) and bool((record.target < 1).all())


def test_explicit_attention_rows_are_probabilities():
    q, k = torch.randn(2, 10, 32), torch.randn(2, 7, 32)
    probs = explicit_attention(q, k, heads=4)
    assert probs.shape == (2, 4, 10, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 10))


def _record(attention: torch.Tensor) -> LayerRecord:
    return LayerRecord(BlockKey("input", 7, 0, 4), (4, 4), attention.flatten(1), None)


def test_face_mask_loss_and_share_point_the_right_way():
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1  # the centre 2x2 cells of a 4x4 grid
    on_face, on_background = torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.1)
    on_face[:, 1:3, 1:3] = 0.1
    on_background[:, 1:3, 1:3] = 0.0
    assert float(face_mask_loss([_record(on_face)], mask)) < 0 < float(face_mask_loss([_record(on_background)], mask))
    assert float(face_share([_record(on_face)], mask)) == pytest.approx(1.0)
    assert float(face_share([_record(on_background)], mask)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="needs face masks"):
        attention_loss("face_mask", [_record(on_face)], None)
    with pytest.raises(ValueError, match="Unknown attention-loss mode"):
        attention_loss("faces", [_record(on_face)], mask)


def test_face_mask_loss_is_the_difference_of_region_means():
    gen = torch.Generator().manual_seed(0)
    attention = torch.rand(2, 4, 4, generator=gen)
    masks = torch.zeros(2, 16, 16)
    masks[0, 4:12, 4:12] = 1  # 4 of 16 cells
    masks[1, 0:8, 0:16] = 1  # 8 of 16 cells
    expected = []
    for a, cells in ((attention[0], attention[0][1:3, 1:3]), (attention[1], attention[1][0:2, :])):
        face_mean = cells.mean()
        background_mean = (a.sum() - cells.sum()) / (16 - cells.numel())
        expected.append(background_mean - face_mean)
    torch.testing.assert_close(face_mask_loss([_record(attention)], masks), torch.stack(expected).mean())
    # attention spread evenly costs nothing, however strong: only moving it onto the face lowers the loss
    for level in (0.01, 0.5):
        assert float(face_mask_loss([_record(torch.full((2, 4, 4), level))], masks)) == pytest.approx(0.0, abs=1e-7)
