"""IDFuse Mix ID Embeds: both mixing options against independent formulas, weight 1/0, spaces, sampling."""

from __future__ import annotations

import pytest
import torch
from factories import make_model
from ip_adapter_files import FITS_TEST_UNETS, write_faceid

from comfyui_idfuse.models.errors import IDFuseInputError
from comfyui_idfuse.models.faces.types import ARCFACE_W600K_512, DLIB_RESNET_128, FaceEmbedding
from comfyui_idfuse.models.infinite_id.identities import TokenMix
from comfyui_idfuse.nodes.encoders import IDFuseLoadIDEncoder
from comfyui_idfuse.nodes.glue.infinite_id import id_layers
from comfyui_idfuse.nodes.id_embeds import IDFuseCombineIDEmbeds, IDFuseMixIDEmbeds
from comfyui_idfuse.nodes.infinite_id import IDFuseInfiniteIDSampler

SETTINGS = {"id_weight": 1.0, "id_start_percent": 0.0, "id_end_percent": 1.0, "mixing": True, "mix_blocks": "all",
            "mix_start_percent": 0.0, "mix_end_percent": 1.0, "adain": "mean", "encoder_lora_strength": 0.0}


def face(seed=0, space=ARCFACE_W600K_512, width=512, clip=False, norm=1.0):
    gen = torch.Generator().manual_seed(seed)
    arcface = torch.nn.functional.normalize(torch.randn(1, width, generator=gen), dim=-1) * norm
    hidden = torch.randn(1, 257, 1280, generator=gen) if clip else None
    uncond = torch.randn(1, 257, 1280, generator=gen) if clip else None
    return FaceEmbedding(arcface=arcface, clip_hidden=hidden, per_photo_arcface=arcface, boxes=torch.zeros(1, 4),
                         keypoints=torch.zeros(1, 5, 2), embedding_space=space, clip_hidden_uncond=uncond,
                         backend="insightface buffalo_l")


def mix(*pairs, mode="embeddings"):
    """Mix node with (id_embeds, weight) pairs."""
    kwargs = {}
    for index, (identity, weight) in enumerate(pairs, 1):
        kwargs[f"id_embeds_{index}"], kwargs[f"weight_{index}"] = identity, weight
    return IDFuseMixIDEmbeds().mix(mode=mode, **kwargs)[0]


def test_embeddings_mode_is_the_renormalised_weighted_sum_of_unit_embeddings():
    a, b, c = face(0, clip=True), face(1, clip=True, norm=0.8), face(2, clip=True)
    out = mix((a, 0.6), (b, 0.2), (c, 0.2))
    weights = [0.6, 0.2, 0.2]
    units = [x.arcface[0] / x.arcface[0].norm() for x in (a, b, c)]
    direction = sum(w * u for w, u in zip(weights, units, strict=True))
    typical_norm = 0.6 * 1.0 + 0.2 * 0.8 + 0.2 * 1.0
    assert torch.allclose(out.arcface[0], direction / direction.norm() * typical_norm, atol=1e-6)
    assert torch.allclose(out.clip_hidden, 0.6 * a.clip_hidden + 0.2 * b.clip_hidden + 0.2 * c.clip_hidden,
                          atol=1e-5)
    assert torch.allclose(out.clip_hidden_uncond, 0.6 * a.clip_hidden_uncond + 0.2 * b.clip_hidden_uncond
                          + 0.2 * c.clip_hidden_uncond, atol=1e-5)
    assert isinstance(out, FaceEmbedding) and out.embedding_space == ARCFACE_W600K_512 and out.num_photos == 3


def test_weights_are_rescaled_to_sum_to_one():
    a, b = face(0), face(1)
    assert torch.allclose(mix((a, 0.2), (b, 0.2)).arcface, mix((a, 0.5), (b, 0.5)).arcface, atol=1e-7)
    with pytest.raises(IDFuseInputError, match="at least one > 0"):
        mix((a, 0.0), (b, 0.0))


def test_clip_features_only_when_every_identity_has_them():
    assert mix((face(0, clip=True), 0.5), (face(1), 0.5)).clip_hidden is None


@pytest.mark.parametrize("mode", ["embeddings", "tokens"])
def test_weight_one_and_zero_return_the_one_identity(mode):
    a, b = face(0, clip=True), face(1, clip=True)
    assert mix((a, 1.0), (b, 0.0), mode=mode) is a
    assert mix((a, 0.0), (b, 1.0), mode=mode) is b


def test_spaces_must_match_and_the_error_names_both():
    with pytest.raises(IDFuseInputError, match="id_embeds_1 holds arcface-w600k-512.*id_embeds_2 holds dlib-resnet-128"):
        mix((face(0), 0.5), (face(1, DLIB_RESNET_128, 128), 0.5))
    with pytest.raises(IDFuseInputError, match="id_embeds_2 holds dlib-resnet-128"):
        mix((face(0), 0.5), (face(1, DLIB_RESNET_128, 128), 0.5), mode="tokens")


def test_inputs_that_cannot_be_mixed_are_refused():
    (regional,) = IDFuseCombineIDEmbeds().combine(face(0), torch.ones(1, 8, 8))
    with pytest.raises(IDFuseInputError, match="id_embeds_2 is a regional set"):
        mix((face(0), 0.5), (regional, 0.5))
    token_mix = mix((face(0), 0.5), (face(1), 0.5), mode="tokens")
    with pytest.raises(IDFuseInputError, match="set mode to tokens"):
        mix((token_mix, 0.5), (face(2), 0.5))


def test_token_mixes_nest_with_their_weights():
    a, b, c = face(0), face(1), face(2)
    inner = mix((a, 0.5), (b, 0.5), mode="tokens")
    outer = mix((inner, 0.5), (c, 0.5), mode="tokens")
    assert isinstance(outer, TokenMix)
    assert outer.faces == (a, b, c) and outer.weights == pytest.approx((0.25, 0.25, 0.5))


@pytest.fixture(scope="module")
def encoder():
    import folder_paths

    folder = folder_paths.get_folder_paths("ipadapter")[0]
    write_faceid(f"{folder}/ip-adapter-faceid_sd15_mix_test.bin", "faceid", "sd15", FITS_TEST_UNETS)
    return IDFuseLoadIDEncoder().load("ipadapter/ip-adapter-faceid_sd15_mix_test.bin")[0]


def test_tokens_mode_mixes_each_identitys_encoded_tokens(encoder):
    a, b = face(0), face(1)
    mixed = mix((a, 0.3), (b, 0.7), mode="tokens")
    assert isinstance(mixed, TokenMix) and mixed.weights == pytest.approx((0.3, 0.7))
    layers = id_layers(encoder, mixed, "sd15")
    # Independent: encode each face, mix the tokens, project them with the layer's own weights.
    module = encoder.encoder
    with torch.no_grad():
        tokens = 0.3 * module.encode(a.arcface) + 0.7 * module.encode(b.arcface)
        negative = module.encode(torch.zeros_like(a.arcface))
        for key, kv in layers.items():
            projection = module.projection(key)
            assert torch.allclose(kv.k_cond, tokens.float() @ projection.to_k.weight.float().T, atol=1e-5)
            assert torch.allclose(kv.v_cond, tokens.float() @ projection.to_v.weight.float().T, atol=1e-5)
            assert torch.allclose(kv.k_uncond, negative.float() @ projection.to_k.weight.float().T, atol=1e-5)
    one = id_layers(encoder, a, "sd15")
    assert not torch.allclose(one[("middle", 0, 0)].k_cond, layers[("middle", 0, 0)].k_cond)


def conditioning(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def test_sampling_with_a_mix(encoder):
    model = make_model("sd15")
    latent = {"samples": torch.zeros(1, 4, 16, 16)}

    def sample(id_embeds):
        with torch.inference_mode():
            ident, _text = IDFuseInfiniteIDSampler().sample(model, conditioning(1), conditioning(2), encoder,
                                                            id_embeds, latent, seed=3, steps=2, cfg=5.0,
                                                            sampler_name="euler", scheduler="normal", denoise=1.0,
                                                            **SETTINGS)
        return ident["samples"]

    a, b = face(0), face(1)
    by_tokens, by_embeddings, only_a = (sample(mix((a, 0.5), (b, 0.5), mode="tokens")),
                                        sample(mix((a, 0.5), (b, 0.5))), sample(a))
    assert torch.isfinite(by_tokens).all() and torch.isfinite(by_embeddings).all()
    assert not torch.equal(by_tokens, only_a) and not torch.equal(by_embeddings, only_a)
