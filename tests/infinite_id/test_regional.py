"""Regional Infinite-ID: several identities in one picture, each inside its mask, on one ID stream."""

from __future__ import annotations

import pytest
import torch
from factories import make_model, random_id_layers
from ip_adapter_files import FITS_TEST_UNETS, write_faceid

from comfyui_idfuse.models.errors import IDFuseInputError
from comfyui_idfuse.models.faces.types import ARCFACE_W600K_512, DLIB_RESNET_128, FaceEmbedding
from comfyui_idfuse.models.infinite_id.attention import (
    IDCrossAttention,
    MixedSelfAttention,
    RegionMasks,
    adain_mean,
    regional_adain,
    stream_views,
)
from comfyui_idfuse.models.infinite_id.identities import RegionalIdentities
from comfyui_idfuse.models.infinite_id.settings import InfiniteIDSettings
from comfyui_idfuse.nodes.encoders import IDFuseLoadIDEncoder
from comfyui_idfuse.nodes.glue.infinite_id import TwoStreamGuider, two_stream_model
from comfyui_idfuse.nodes.id_embeds import IDFuseCombineIDEmbeds
from comfyui_idfuse.nodes.infinite_id import IDFuseInfiniteIDGuider, IDFuseInfiniteIDSampler

HEADS, CHANNELS, TOKENS = 2, 8, 4
LATENT_HW = (4, 6)  # a layer at downscale 1: 24 query tokens
SETTINGS = {"id_weight": 1.0, "id_start_percent": 0.0, "id_end_percent": 1.0, "mixing": True, "mix_blocks": "all",
            "mix_start_percent": 0.0, "mix_end_percent": 1.0, "adain": "mean", "encoder_lora_strength": 0.0}


def sdpa_attention(q, k, v, heads, **_kwargs):
    b, n, inner = q.shape
    split = [t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    return torch.nn.functional.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, inner)


def reference_attention(q, k, v, heads):
    """softmax(Q K^T / sqrt(d)) V per head, written out."""
    d = q.shape[-1] // heads
    out = torch.empty_like(q)
    for row in range(q.shape[0]):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            out[row, :, sl] = torch.softmax(q[row, :, sl] @ k[row, :, sl].T / d ** 0.5, dim=-1) @ v[row, :, sl]
    return out


def half_masks(height=8, width=12) -> torch.Tensor:
    """(2, H, W): identity 0 on the left half, identity 1 on the right third (the middle sixth is background)."""
    masks = torch.zeros(2, height, width)
    masks[0, :, : width // 2] = 1.0
    masks[1, :, width - width // 3:] = 1.0
    return masks


def layer_kv(seed):
    gen = torch.Generator().manual_seed(seed)
    from comfyui_idfuse.models.infinite_id.attention import IDKeysValues

    return {("middle", 0, 0): IDKeysValues(*(torch.randn(1, TOKENS, CHANNELS, generator=gen, dtype=torch.float64)
                                              for _ in range(4)))}


def options(cond_or_uncond=(0, 1)):
    return {"n_heads": HEADS, "cond_or_uncond": list(cond_or_uncond), "sigmas": torch.tensor([1.0]),
            "block": ("middle", 0), "block_index": 0, "original_shape": [2, 4, *LATENT_HW]}


def qkv(rows=4, seed=3):
    gen = torch.Generator().manual_seed(seed)
    n = LATENT_HW[0] * LATENT_HW[1]
    return [torch.randn(rows, n, CHANNELS, generator=gen, dtype=torch.float64) for _ in range(3)]


# --- the layer patches -------------------------------------------------------------------------------------------


def test_outside_every_mask_the_id_rows_are_the_text_cross_attention_bit_for_bit():
    masks = RegionMasks(half_masks())
    patch = IDCrossAttention(sdpa_attention, [layer_kv(1), layer_kv(2)], 1.3, masks=masks)
    q, k, v = qkv()
    out = patch(q, k, v, options())
    unpatched = sdpa_attention(q, k, v, HEADS)
    outside = masks.on_grid(q.shape[1], LATENT_HW, q).sum(0) == 0
    assert outside.any() and not outside.all()
    assert torch.equal(out[:, outside], unpatched[:, outside])
    assert not torch.equal(out[:, ~outside], unpatched[:, ~outside])
    text_rows, _ = stream_views(out, 2)
    assert torch.equal(text_rows, stream_views(unpatched, 2)[0])  # the text stream is never changed


def test_regional_cross_attention_formula():
    masks = half_masks()
    patch = IDCrossAttention(sdpa_attention, [layer_kv(1), layer_kv(2)], 0.7, masks=RegionMasks(masks))
    q, k, v = qkv()
    out = patch(q, k, v, options((0, 1)))
    # Independent: each mask's area share of every 2x2 block of the 8x12 mask (the 4x6 grid), then the sum.
    shares = masks.reshape(2, 4, 2, 6, 2).mean((2, 4)).reshape(2, -1).double()
    for row, cond in enumerate([None, 0, None, 1]):  # text and ID row of the positive, then of the negative
        expected = reference_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], HEADS)[0]
        if cond is not None:
            for index, layer in enumerate((layer_kv(1), layer_kv(2))):
                kv = layer[("middle", 0, 0)]
                k_id, v_id = (kv.k_cond, kv.v_cond) if cond == 0 else (kv.k_uncond, kv.v_uncond)
                expected = expected + 0.7 * shares[index][:, None] * reference_attention(q[row:row + 1], k_id, v_id,
                                                                                         HEADS)[0]
        assert torch.allclose(out[row], expected, atol=1e-10), row


def test_one_identity_with_a_full_mask_is_the_plain_patch_bit_for_bit():
    q, k, v = qkv()
    full = RegionMasks(torch.ones(1, 8, 12))
    plain_cross = IDCrossAttention(sdpa_attention, layer_kv(1), 1.0)
    regional_cross = IDCrossAttention(sdpa_attention, [layer_kv(1)], 1.0, masks=full)
    assert torch.equal(regional_cross(q, k, v, options()), plain_cross(q, k, v, options()))
    plain_mixed = MixedSelfAttention(sdpa_attention, "mean")
    regional_mixed = MixedSelfAttention(sdpa_attention, "mean", masks=full)
    assert torch.equal(regional_mixed(q, k, v, options()), plain_mixed(q, k, v, options()))


@pytest.mark.parametrize("adain", ["mean", "full"])
def test_regional_adain_is_adain_inside_each_region(adain):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 24, 5, generator=gen, dtype=torch.float64), torch.randn(2, 24, 5, generator=gen,
                                                                                  dtype=torch.float64)
    regions = torch.zeros(3, 24, dtype=torch.float64)
    regions[0, :10], regions[1, 10:16], regions[2, 16:] = 1.0, 1.0, 1.0
    out = regional_adain(x, y, regions, adain)
    for region in ([*range(10)], [*range(10, 16)], [*range(16, 24)]):
        xs, ys = x[:, region], y[:, region]
        if adain == "mean":
            expected = adain_mean(xs, ys)
        else:  # population standard deviation over the region's tokens
            sx, sy = xs.std(1, keepdim=True, unbiased=False), ys.std(1, keepdim=True, unbiased=False)
            expected = (xs - xs.mean(1, keepdim=True)) / (sx + 1e-5) * sy + ys.mean(1, keepdim=True)
        assert torch.allclose(out[:, region], expected, atol=1e-10)
    assert torch.equal(regional_adain(x, y, regions, "off"), x)


def test_soft_region_weights_sum_to_one_and_overlaps_are_shared():
    masks = torch.zeros(2, 8, 12)
    masks[0, :, :8] = 1.0
    masks[1, :, 4:] = 1.0  # overlaps the first in columns 4-7
    weights = RegionMasks(masks).adain_weights(24, LATENT_HW, torch.zeros(1, dtype=torch.float64))
    assert torch.allclose(weights.sum(0), torch.ones(24, dtype=torch.float64))
    grid = weights.reshape(-1, 4, 6)
    assert len(weights) == 2  # no background left: it is dropped
    assert torch.equal(grid[0, :, 2:4], torch.full((4, 2), 0.5, dtype=torch.float64))


def test_mixed_self_attention_uses_each_regions_statistics():
    masks = half_masks()
    patch = MixedSelfAttention(sdpa_attention, "mean", masks=RegionMasks(masks))
    q, k, v = qkv()
    out = patch(q, k, v, options())
    shares = masks.reshape(2, 4, 2, 6, 2).mean((2, 4)).reshape(2, -1).double()
    regions = torch.cat([shares, 1 - shares.sum(0, keepdim=True)])
    for text_row, id_row in ((0, 1), (2, 3)):
        kt, vt = k[text_row:text_row + 1], v[text_row:text_row + 1]
        ki, vi = k[id_row:id_row + 1], v[id_row:id_row + 1]
        keys = torch.cat([regional_adain(ki, kt, regions, "mean"), kt], 1)
        values = torch.cat([regional_adain(vi, vt, regions, "mean"), vt], 1)
        assert torch.allclose(out[id_row], reference_attention(q[id_row:id_row + 1], keys, values, HEADS)[0],
                              atol=1e-10)
        assert torch.equal(out[text_row], sdpa_attention(q, k, v, HEADS)[text_row])


def test_grids_of_every_layer_size_are_found():
    assert RegionMasks.grid(5 * 4, (9, 7)) == (5, 4)  # downscale 2 rounds up
    assert RegionMasks.grid(63, (9, 7)) == (9, 7)
    with pytest.raises(IDFuseInputError, match="no grid"):
        RegionMasks.grid(11, (9, 7))


def test_identity_and_mask_counts_must_match():
    with pytest.raises(IDFuseInputError, match="one mask per identity"):
        IDCrossAttention(sdpa_attention, [layer_kv(1), layer_kv(2)], 1.0, masks=RegionMasks(torch.ones(1, 4, 4)))
    with pytest.raises(IDFuseInputError, match="without region masks"):
        IDCrossAttention(sdpa_attention, [layer_kv(1), layer_kv(2)], 1.0)


# --- sampling on a small UNet ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15():
    return make_model("sd15")


ON = InfiniteIDSettings()


def sample_two_streams(model, layers, masks=None, settings=ON):
    import comfy.samplers

    cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5))
    guider = TwoStreamGuider(two_stream_model(model, layers, settings, masks), return_text_stream=True)
    guider.set_conds([[cond, {}]], [[cond.flip(1), {}]])
    guider.set_cfg(5.0)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2)
    with torch.inference_mode():
        out = guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0)
    return out[:1], out[1:]


def test_two_identities_one_id_stream(sd15):
    seen_rows = []
    model = sd15.clone()
    model.set_model_unet_function_wrapper(lambda apply, args: seen_rows.append(args["input"].shape[0])
                                          or apply(args["input"], args["timestep"], **args["c"]))
    a, b = random_id_layers(sd15, "sd15", seed=1), random_id_layers(sd15, "sd15", seed=2)
    masks = RegionMasks(torch.stack([torch.ones(16, 16).tril(), torch.ones(16, 16).triu(1)]))
    ident, text = sample_two_streams(model, [a, b], masks)
    assert set(seen_rows) == {4}  # positive and negative chunk, each one text row and one ID row
    swapped, text_swapped = sample_two_streams(model, [b, a], masks)
    assert torch.equal(text, text_swapped)
    assert not torch.equal(ident, swapped)
    only_a, _ = sample_two_streams(model, a)
    assert not torch.equal(ident, only_a)


# --- the nodes ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    import folder_paths

    folder = folder_paths.get_folder_paths("ipadapter")[0]
    write_faceid(f"{folder}/ip-adapter-faceid_sd15_regional_test.bin", "faceid", "sd15", FITS_TEST_UNETS)
    return IDFuseLoadIDEncoder().load("ipadapter/ip-adapter-faceid_sd15_regional_test.bin")[0]


def face(seed=0, space=ARCFACE_W600K_512, width=512):
    arcface = torch.nn.functional.normalize(torch.randn(1, width, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return FaceEmbedding(arcface=arcface, clip_hidden=None, per_photo_arcface=arcface, boxes=torch.zeros(1, 4),
                         keypoints=torch.zeros(1, 5, 2), embedding_space=space, backend="insightface buffalo_l")


def conditioning(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def run_sampler(model, encoder, id_embeds):
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    with torch.inference_mode():
        ident, text = IDFuseInfiniteIDSampler().sample(model, conditioning(1), conditioning(2), encoder, id_embeds,
                                                       latent, seed=3, steps=2, cfg=5.0, sampler_name="euler",
                                                       scheduler="normal", denoise=1.0, **SETTINGS)
    return ident["samples"], text["samples"]


def test_one_identity_set_with_a_full_mask_reproduces_the_sampler_bit_for_bit(sd15, encoder):
    (one,) = IDFuseCombineIDEmbeds().combine(face(0), torch.ones(1, 128, 128))
    assert isinstance(one, RegionalIdentities) and len(one.regions) == 1
    ident, text = run_sampler(sd15, encoder, one)
    ident_plain, text_plain = run_sampler(sd15, encoder, face(0))
    assert torch.equal(ident, ident_plain) and torch.equal(text, text_plain)


def test_two_people_through_the_nodes(sd15, encoder):
    left, right = torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)
    left[..., :32], right[..., 32:] = 1.0, 1.0
    (first,) = IDFuseCombineIDEmbeds().combine(face(0), left)
    (both,) = IDFuseCombineIDEmbeds().combine(face(1), right, regions=first)
    assert len(both.regions) == 2 and len(first.regions) == 1  # chaining does not change the earlier set
    ident, text = run_sampler(sd15, encoder, both)
    ident_a, text_a = run_sampler(sd15, encoder, face(0))
    assert torch.isfinite(ident).all()
    assert torch.equal(text, text_a)
    assert not torch.equal(ident, ident_a)
    (guider,) = IDFuseInfiniteIDGuider().build(sd15, conditioning(1), conditioning(2), encoder, both, 5.0, False,
                                              **SETTINGS)
    cross = guider.model_patcher.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0, 0)]
    assert len(cross.identities) == 2 and len(cross.masks) == 2


def test_combine_errors_name_the_input_and_the_fix():
    node = IDFuseCombineIDEmbeds()
    (first,) = node.combine(face(0), torch.ones(1, 8, 8))
    with pytest.raises(IDFuseInputError, match="arcface-w600k-512.*dlib-resnet-128"):
        node.combine(face(1, DLIB_RESNET_128, 128), torch.ones(1, 8, 8), regions=first)
    with pytest.raises(IDFuseInputError, match="one mask per identity"):
        node.combine(face(1), torch.ones(2, 8, 8))
    with pytest.raises(IDFuseInputError, match="empty"):
        node.combine(face(1), torch.zeros(1, 8, 8))
    with pytest.raises(IDFuseInputError, match="connect it to regions"):
        node.combine(first, torch.ones(1, 8, 8))
    with pytest.raises(IDFuseInputError, match="not a regional set"):
        node.combine(face(1), torch.ones(1, 8, 8), regions=face(2))


def test_masks_of_different_sizes_are_resized_to_the_first():
    node = IDFuseCombineIDEmbeds()
    (first,) = node.combine(face(0), torch.ones(1, 8, 8))
    (both,) = node.combine(face(1), torch.ones(1, 16, 32), regions=first)
    assert both.masks.shape == (2, 8, 8) and torch.equal(both.masks[1], torch.ones(8, 8))
