"""Infinite-ID: AdaIN and mixed attention against independent formulas; two-stream sampling semantics."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import make_model, random_id_layers, sdxl_extras

from comfyui_idfuse.models.infinite_id.attention import (
    MixedSelfAttention,
    adain_full,
    adain_mean,
    join_streams,
    mixed_attention,
    stream_views,
)
from comfyui_idfuse.models.infinite_id.settings import InfiniteIDSettings
from comfyui_idfuse.models.unet import block_keys
from comfyui_idfuse.nodes.glue.infinite_id import TwoStreamGuider, two_stream_model


def reference_attention(q, k, v, heads):
    """softmax(Q K^T / sqrt(d)) V per head, written out."""
    b, n, inner = q.shape
    d = inner // heads
    out = torch.empty_like(q)
    for row in range(b):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            weights = torch.softmax(q[row, :, sl] @ k[row, :, sl].T / d ** 0.5, dim=-1)
            out[row, :, sl] = weights @ v[row, :, sl]
    return out


def sdpa_attention(q, k, v, heads, **_kwargs):
    b, n, inner = q.shape
    split = [t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    return torch.nn.functional.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, inner)


def test_adain_mean_per_channel():
    x, y = torch.randn(2, 10, 6, dtype=torch.float64), torch.randn(2, 7, 6, dtype=torch.float64)
    out = adain_mean(x, y)
    for b in range(2):
        for c in range(6):
            expected = x[b, :, c] - x[b, :, c].sum() / 10 + y[b, :, c].sum() / 7
            assert torch.allclose(out[b, :, c], expected, atol=1e-12)
    assert torch.allclose(out.mean(1), y.mean(1), atol=1e-12)  # the mean is the text's
    full = adain_full(x, y)
    assert torch.allclose(full.std(1), y.std(1), atol=1e-4)


def test_mixed_attention_formula():
    torch.manual_seed(0)
    heads, n = 4, 9
    q_id, k_id, v_id, k_t, v_t = (torch.randn(2, n, 16, dtype=torch.float64) for _ in range(5))
    out = mixed_attention(q_id, k_id, v_id, k_t, v_t, heads, sdpa_attention, "mean")
    k_ref = torch.cat([k_id - k_id.mean(1, keepdim=True) + k_t.mean(1, keepdim=True), k_t], 1)
    v_ref = torch.cat([v_id - v_id.mean(1, keepdim=True) + v_t.mean(1, keepdim=True), v_t], 1)
    assert torch.allclose(out, reference_attention(q_id, k_ref, v_ref, heads), atol=1e-10)
    plain_concat = mixed_attention(q_id, k_id, v_id, k_t, v_t, heads, sdpa_attention, "off")
    assert torch.allclose(plain_concat, reference_attention(q_id, torch.cat([k_id, k_t], 1), torch.cat([v_id, v_t], 1), heads), atol=1e-10)


def test_stream_layout_round_trip():
    t = torch.arange(2 * 2 * 3).view(12, 1)  # 2 chunks x (3 text + 3 id)
    text, ident = stream_views(t, 2)
    assert text.flatten().tolist() == [0, 1, 2, 6, 7, 8] and ident.flatten().tolist() == [3, 4, 5, 9, 10, 11]
    assert torch.equal(join_streams(text, ident, 2), t)


def test_mixed_self_attention_patch_rows():
    torch.manual_seed(1)
    heads, chunks, per_stream = 2, 2, 3
    q, k, v = (torch.randn(chunks * 2 * per_stream, 5, 8, dtype=torch.float64) for _ in range(3))
    patch = MixedSelfAttention(sdpa_attention, "mean")
    out = patch(q, k, v, {"n_heads": heads, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([1.0])})
    for c in range(chunks):
        for i in range(per_stream):
            t_row, id_row = c * 2 * per_stream + i, c * 2 * per_stream + per_stream + i
            assert torch.allclose(out[t_row], reference_attention(q[t_row:t_row + 1], k[t_row:t_row + 1], v[t_row:t_row + 1], heads)[0], atol=1e-10)
            keys = torch.cat([adain_mean(k[id_row:id_row + 1], k[t_row:t_row + 1]), k[t_row:t_row + 1]], 1)
            values = torch.cat([adain_mean(v[id_row:id_row + 1], v[t_row:t_row + 1]), v[t_row:t_row + 1]], 1)
            assert torch.allclose(out[id_row], reference_attention(q[id_row:id_row + 1], keys, values, heads)[0], atol=1e-10)


def run_two_streams(model, family, settings, batch=1, seed=0, steps=3, size=16):
    import comfy.samplers

    cond = torch.randn(1, 77, 2048 if family == "sdxl" else 768, generator=torch.Generator().manual_seed(5))
    positive, negative = [[cond, sdxl_extras(cond)]], [[cond.flip(1), sdxl_extras(cond)]]
    patched = two_stream_model(model, random_id_layers(model, family), settings)
    guider = TwoStreamGuider(patched, return_text_stream=True)
    guider.set_conds(positive, negative)
    guider.set_cfg(5.0)
    noise = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    with torch.inference_mode():
        out = guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=seed)
        # Plain sampling with the same batch layout (noise twice): CPU kernels are not batch-size
        # invariant in the last bits, so a batch of B would differ from a batch of 2B by rounding.
        plain_guider = comfy.samplers.CFGGuider(model)
        plain_guider.set_conds(positive, negative)
        plain_guider.set_cfg(5.0)
        doubled = torch.cat([noise, noise])
        plain = plain_guider.sample(doubled, torch.zeros_like(doubled), comfy.samplers.sampler_object("euler"), sigmas,
                                    seed=seed)[batch:]
    return out[:batch], out[batch:], plain, patched


OFF = InfiniteIDSettings(id_weight=0.0, mixing=False)
ON = InfiniteIDSettings(id_weight=1.0, mixing=True)


@pytest.fixture(scope="module")
def sd15():
    return make_model("sd15")


def test_weight_zero_mixing_off_is_plain_sampling(sd15):
    ident, text, plain, _ = run_two_streams(sd15, "sd15", OFF)
    assert torch.equal(ident, plain)
    assert torch.equal(text, plain)


@pytest.mark.parametrize("batch", [1, 2])
def test_text_stream_is_never_affected(sd15, batch):
    ident_off, text_off, plain, _ = run_two_streams(sd15, "sd15", OFF, batch=batch)
    ident_on, text_on, _, patched = run_two_streams(sd15, "sd15", ON, batch=batch)
    assert torch.equal(text_on, text_off)
    assert not torch.equal(ident_on, ident_off)
    mix_only, _, _, _ = run_two_streams(sd15, "sd15", InfiniteIDSettings(id_weight=0.0, mixing=True), batch=batch)
    assert not torch.equal(mix_only, ident_off)


def test_every_cross_attention_layer_gets_id_attention(sd15):
    _, _, _, patched = run_two_streams(sd15, "sd15", ON, steps=1)
    cross = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0, 0)]
    assert {k for k, _dev, _dtype in cross._on_device} == {k.key for k in block_keys("sd15")}


def test_sdxl_two_streams():
    model = make_model("sdxl")
    ident, text, plain, _ = run_two_streams(model, "sdxl", ON, steps=2)
    assert torch.isfinite(ident).all() and not torch.equal(ident, text)


def test_input_model_untouched(sd15):
    before = copy.deepcopy(sd15.model_options)
    two_stream_model(sd15, random_id_layers(sd15, "sd15"), ON)
    assert sd15.model_options == before


def test_missing_layers_error(sd15):
    layers = random_id_layers(sd15, "sd15")
    del layers[("middle", 0, 0)]
    with pytest.raises(ValueError, match="no ID keys/values for layers"):
        two_stream_model(sd15, layers, ON)
