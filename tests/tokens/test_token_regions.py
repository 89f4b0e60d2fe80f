"""Token regions: an identity acts only inside its mask; without masks nothing changes. IDFuse Region Masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import make_clip, make_id_tokens, make_model, sample

from comfyui_idfuse.models.errors import IDFuseInputError, IDTokensError, NoFaceError
from comfyui_idfuse.models.faces.types import DetectedFaces
from comfyui_idfuse.models.tokens.identity_set import combine as combine_parts
from comfyui_idfuse.models.tokens.patch import StageContextPatch, StageContexts
from comfyui_idfuse.models.tokens.regions import TokenRegionAttention, TokenRegions, split_regions
from comfyui_idfuse.nodes.regions import IDFuseRegionMasks
from comfyui_idfuse.nodes.tokens import STAGE_CONTEXTS, IDFuseApplyIDTokens, IDFuseCombineIDTokens, IDFuseEncodeWithID

encode = IDFuseEncodeWithID().encode
combine = IDFuseCombineIDTokens().combine
apply_tokens = IDFuseApplyIDTokens().apply
make_regions = IDFuseRegionMasks().make

TEXT = "a photo of sks and ohwx shaking hands"
SIZE = 16  # latent side: the first cross-attention layer is a 16 x 16 grid


@pytest.fixture(scope="module")
def clip(tokenizer_dir):
    return make_clip("sd15", tokenizer_dir)


@pytest.fixture(scope="module")
def model():
    return make_model("sd15")


@pytest.fixture(scope="module")
def pair():
    return (make_id_tokens(num_stages=2, placeholder="sks", seed=1, scale=3.0),
            make_id_tokens(num_stages=3, placeholder="ohwx", initializer="man", seed=2, scale=3.0))


def left_half(height=64, width=64):
    mask = torch.zeros(1, height, width)
    mask[..., : width // 2] = 1.0
    return mask


def first_layer_outputs(model, positive, negative):
    """The output of the first cross-attention layer (input.1), whose query no patch can have changed, per step."""
    outputs = []

    def record(n, extra_options):
        if extra_options["block"] == ("input", 1):
            outputs.append((n.clone(), list(extra_options["cond_or_uncond"])))
        return n

    observed = model.clone()
    observed.set_model_attn2_output_patch(record)
    sample(observed, positive, negative, steps=1, size=SIZE)
    return outputs


def test_without_masks_nothing_is_installed(clip, model, pair):
    positive = encode(clip, combine(*pair)[0], TEXT)[0]
    assert positive[0][1][STAGE_CONTEXTS].regions is None
    (patched,) = apply_tokens(model, positive, 1.0, 0.0, 1.0)
    assert "attn2" not in patched.model_options["transformer_options"].get("patches_replace", {})


def test_outside_the_mask_the_layer_output_is_the_plain_one_bit_for_bit(clip, model):
    tokens = make_id_tokens(num_stages=2, seed=4, scale=3.0)
    alone_positive = encode(clip, combine_parts([(tokens, left_half(), "id_tokens_a")]), "a photo of sks")[0]
    regions = alone_positive[0][1][STAGE_CONTEXTS].regions
    assert regions is not None and regions.identities == (0,) and set(regions.keys) == {0}
    negative = [[torch.zeros(1, 77, 768), {}]]
    (patched,) = apply_tokens(model, alone_positive, 1.0, 0.0, 1.0)
    plain_out = first_layer_outputs(model, alone_positive, negative)
    patched_out = first_layer_outputs(patched, alone_positive, negative)
    assert len(plain_out) == len(patched_out) == 1
    (plain, rows), (ours, _) = plain_out[0], patched_out[0]
    row = rows.index(0)  # the positive's row
    grid = ours[row].view(SIZE, SIZE, -1)
    plain_grid = plain[row].view(SIZE, SIZE, -1)
    assert torch.equal(grid[:, SIZE // 2:], plain_grid[:, SIZE // 2:])  # outside: bit for bit
    assert not torch.equal(grid[:, : SIZE // 2], plain_grid[:, : SIZE // 2])  # inside: the identity acts
    other = 1 - row
    assert torch.equal(ours[other], plain[other])  # the negative row is untouched
    # The whole picture changes only where it may: a full sample stays finite and differs from the plain one.
    out = sample(patched, alone_positive, negative, steps=2, size=SIZE)
    assert torch.isfinite(out).all() and not torch.equal(out, sample(model, alone_positive, negative, steps=2,
                                                                         size=SIZE))
    # Without the mask the identity also acts on the right half.
    unmasked = encode(clip, tokens, "a photo of sks")[0]
    (everywhere,) = apply_tokens(model, unmasked, 1.0, 0.0, 1.0)
    (free, _), = first_layer_outputs(everywhere, unmasked, negative)
    assert not torch.equal(free[row].view(SIZE, SIZE, -1)[:, SIZE // 2:], plain_grid[:, SIZE // 2:])


def _layer_and_contexts(seed=0, length=77, width=768):
    from comfy.ldm.modules.attention import CrossAttention

    gen = torch.Generator().manual_seed(seed)
    layer = CrossAttention(query_dim=32, context_dim=width, heads=2, dim_head=16)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    encodings = {name: torch.randn(1, length, width, generator=gen) for name in ("plain", "a", "b", "ab")}
    return layer, encodings


def test_every_position_gets_its_own_subsets_encoding():
    """Two masked identities (left, right half) on a layer at downscale 2: each position's output is the
    attention over the encoding with exactly the identities whose masks hold it; a coarse grid is handled."""
    from comfy.ldm.modules.attention import optimized_attention

    layer, enc = _layer_and_contexts()
    left = left_half()[0]
    top = torch.zeros(64, 64)
    top[:32] = 1.0
    regions = TokenRegions(identities=(0, 1), masks=(left, top),
                           keys={0: enc["plain"], 1: enc["a"], 2: enc["b"]},
                           values={0: enc["plain"], 1: enc["a"], 2: enc["b"]})
    contexts = StageContexts(family="sd15", placeholder="sks", plain=enc["plain"], keys=enc["ab"], values=enc["ab"],
                             regions=regions)
    patch = StageContextPatch([contexts], 1.0, timestep_of_sigma=lambda s: s)
    key = ("output", 6, 0)
    attention = TokenRegionAttention(optimized_attention, {key: (layer.to_k, layer.to_v)}, {key: 2})
    latent = (12, 16)  # layer grid 6 x 8
    x = torch.randn(2, 48, 32, generator=torch.Generator().manual_seed(3))
    negative = torch.randn(1, 77, 768)
    context = torch.cat([enc["plain"], negative])
    options = {"sigmas": torch.tensor([10.0]), "n_heads": 2, "block": key[:2], "block_index": 0,
               "original_shape": [2, 4, *latent]}
    n, keys_ctx, values_ctx = patch(layer.to_q(x), context, context, options)
    with torch.no_grad():
        out = attention(n, layer.to_k(keys_ctx), layer.to_v(values_ctx), options)
        expected = {name: optimized_attention(layer.to_q(x), layer.to_k(torch.cat([enc[name], negative])),
                                              layer.to_v(torch.cat([enc[name], negative])), 2)
                    for name in enc}
    cells = out[0].view(6, 8, -1)
    wanted = {name: e[0].view(6, 8, -1) for name, e in expected.items()}
    assert torch.equal(cells[3:, 4:], wanted["plain"][3:, 4:])  # bottom right: neither mask
    assert torch.equal(cells[3:, :4], wanted["a"][3:, :4])  # bottom left: the first identity only
    assert torch.equal(cells[:3, 4:], wanted["b"][:3, 4:])  # top right: the second only
    assert torch.equal(cells[:3, :4], wanted["ab"][:3, :4])  # top left: both
    assert torch.equal(out[1], expected["ab"][1])  # the negative row: its own context


def test_masks_are_encoded_for_every_subset(clip, pair):
    first, second = pair
    left, right = left_half(), 1 - left_half()
    contexts = encode(clip, combine(first, second, left, right)[0], TEXT)[0][0][1][STAGE_CONTEXTS]
    regions = contexts.regions
    assert regions.identities == (0, 1) and set(regions.keys) == {0, 1, 2}
    assert torch.equal(regions.keys[0][0], contexts.plain[0])  # nobody spliced: the plain prompt
    only_first = encode(clip, first, TEXT.replace("ohwx", "man"))[0][0][1][STAGE_CONTEXTS]
    # Subset {first}: its vectors at its stage of each segment, the other placeholder its initialiser.
    for segment, (stage, _other) in enumerate(contexts.segments):
        assert torch.equal(regions.keys[1][segment], only_first.keys[stage])
        assert torch.equal(regions.values[1][segment], only_first.values[stage])


def test_mask_errors(pair):
    first, second = pair
    (with_mask,) = combine(first, second, left_half(), None)
    with pytest.raises(IDTokensError, match="id_tokens_a already carries a region for 'sks'"):
        combine(with_mask, make_id_tokens(placeholder="hta"), left_half(), None)
    with pytest.raises(IDTokensError, match="The mask for id_tokens_b has shape"):
        combine(first, second, None, torch.zeros(2, 2, 3, 3))


def test_region_masks_splits():
    masks = make_regions("left | right", 64, 32)
    assert len(masks) == 4 and all(m.shape == (1, 32, 64) for m in masks)
    assert torch.equal(masks[0][0], left_half(32, 64)[0]) and torch.equal(masks[1][0], 1 - left_half(32, 64)[0])
    assert not masks[2].any() and not masks[3].any()
    grid = make_regions("2 x 2 grid", 8, 8)
    assert torch.equal(sum(m for m in grid), torch.ones(1, 8, 8))  # the cells tile the picture
    assert grid[1][0, 0, 7] == 1 and grid[2][0, 7, 0] == 1  # row by row
    assert [m.sum().item() for m in split_regions("left | middle | right", 3, 9)] == [9.0, 9.0, 9.0]
    image = torch.zeros(1, 40, 24, 3)
    assert make_regions("top | bottom", 512, 512, layout_image=image)[0].shape == (1, 40, 24)


class _FakeFaces:
    name = "test detector"

    def __init__(self, boxes):
        self.boxes = boxes

    def detect(self, rgb):
        assert rgb.dtype == np.uint8 and rgb.shape[-1] == 3
        return DetectedFaces.left_to_right(np.array(self.boxes, dtype=np.float32), np.ones(len(self.boxes)), None)


def test_region_masks_from_faces():
    image = torch.rand(1, 64, 96, 3)
    masks = make_regions("faces in layout_image", 8, 8, layout_image=image,
                         face_analysis=_FakeFaces([[60, 10, 80, 30], [10, 20, 30, 40]]))
    assert masks[0].shape == (1, 64, 96)
    assert masks[0][0, 30, 20] == 1 and masks[0][0, 20, 70] == 0  # left to right: the left face first
    assert masks[1][0, 20, 70] == 1 and not masks[2].any()
    with pytest.raises(IDFuseInputError, match="needs the layout_image input"):
        make_regions("faces in layout_image", 8, 8)
    with pytest.raises(NoFaceError, match="No face found in layout_image by the test detector"):
        make_regions("faces in layout_image", 8, 8, layout_image=image, face_analysis=_FakeFaces([]))
