"""What the Infinite-ID nodes make of ID_EMBEDS with each encoder: the embedding-space check, FaceID-Plus's
negative tokens from the unconditional image's CLIP features, and FaceID-PlusV2's s_scale."""

from __future__ import annotations

import functools
import uuid

import pytest
import torch
from factories import make_model
from ip_adapter_files import FITS_TEST_UNETS, random_clip_vision, write_faceid

from comfyui_idfuse.models.encoders.kinds.faceid_plus import FaceIDPlus, FaceIDPlusV2
from comfyui_idfuse.models.errors import IDEncoderError
from comfyui_idfuse.models.faces.types import ARCFACE_GLINTR100_512, ARCFACE_W600K_512, DLIB_RESNET_128, FaceEmbedding
from comfyui_idfuse.models.unet import block_keys
from comfyui_idfuse.nodes.encoders import IDFuseLoadIDEncoder
from comfyui_idfuse.nodes.glue.clip_vision import clip_vision_penultimate, clip_vision_unconditional
from comfyui_idfuse.nodes.glue.infinite_id import id_layers
from comfyui_idfuse.nodes.infinite_id import IDFuseInfiniteIDGuider, IDFuseInfiniteIDSampler

SETTINGS = {"id_weight": 1.0, "id_start_percent": 0.0, "id_end_percent": 1.0, "mixing": True, "mix_blocks": "all",
            "mix_start_percent": 0.0, "mix_end_percent": 1.0, "adain": "mean", "encoder_lora_strength": 0.0}


@functools.cache
def loaded_encoder(kind: str):
    """An ID_ENCODER of a synthetic SD1.5 file of the kind, through IDFuse Load ID Encoder."""
    import folder_paths

    name = {"faceid": "ip-adapter-faceid", "faceid_plus": "ip-adapter-faceid-plus",
            "faceid_plusv2": "ip-adapter-faceid-plusv2"}[kind] + f"_sd15_{uuid.uuid4().hex[:6]}.bin"
    write_faceid(f"{folder_paths.get_folder_paths('ipadapter')[0]}/{name}", kind, "sd15", FITS_TEST_UNETS)
    (encoder,) = IDFuseLoadIDEncoder().load(f"ipadapter/{name}")
    assert encoder.encoder.kind == kind
    return encoder


@pytest.fixture(scope="module")
def clip_vision():
    return random_clip_vision()


@pytest.fixture(scope="module")
def sd15():
    return make_model("sd15")


def id_embeds(space=ARCFACE_W600K_512, width=512, clip=None, uncond=None, backend="insightface buffalo_l", seed=0):
    face = torch.nn.functional.normalize(torch.randn(1, width, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return FaceEmbedding(arcface=face, clip_hidden=clip, per_photo_arcface=face, boxes=torch.zeros(1, 4),
                         keypoints=torch.zeros(1, 5, 2), embedding_space=space, clip_hidden_uncond=uncond,
                         backend=backend)


def conditioning(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def build_guider(model, encoder, embeds, **overrides):
    return IDFuseInfiniteIDGuider().build(model, conditioning(1), conditioning(2), encoder, embeds, 5.0, False,
                                          **{**SETTINGS, **overrides})


# --- embedding spaces ------------------------------------------------------------------------------


def test_both_nodes_refuse_antelopev2_embeddings_for_a_faceid_encoder(sd15):
    encoder = loaded_encoder("faceid")
    embeds = id_embeds(ARCFACE_GLINTR100_512, backend="insightface antelopev2")
    with pytest.raises(IDEncoderError, match=r"arcface-w600k-512.*arcface-glintr100-512.*insightface antelopev2.*"
                                             r"Load buffalo_l in IDFuse Load Face Analysis"):
        build_guider(sd15, encoder, embeds)
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    with pytest.raises(IDEncoderError, match="arcface-glintr100-512"):
        IDFuseInfiniteIDSampler().sample(sd15, conditioning(1), conditioning(2), encoder, embeds, latent, seed=0,
                                         steps=1, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                                         **SETTINGS)
    build_guider(sd15, encoder, id_embeds())  # buffalo_l's are fine


def test_a_dlib_embedding_is_refused_clearly(sd15):
    with pytest.raises(IDEncoderError, match=r"takes 512-wide face embeddings.*128-wide ones of dlib-resnet-128"):
        build_guider(sd15, loaded_encoder("faceid"), id_embeds(DLIB_RESNET_128, 128, backend="dlib HOG"))


# --- FaceID-Plus negatives ---------------------------------------------------------------------------


def test_plus_negative_tokens_come_from_the_unconditional_clip_features(clip_vision):
    encoder = loaded_encoder("faceid_plus")
    module = encoder.encoder
    crops = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(3))
    clip = clip_vision_penultimate(clip_vision, crops)
    uncond = clip_vision_unconditional(clip_vision)
    # Independently: the reference's negative is the CLIP vision model of an all-zero normalised input.
    with torch.no_grad():
        reference_uncond = clip_vision.model(pixel_values=torch.zeros(1, 3, 224, 224), intermediate_output=-2)[1]
    torch.testing.assert_close(uncond, reference_uncond, rtol=0, atol=1e-5)
    assert (uncond - clip_vision_penultimate(clip_vision, torch.zeros(1, 224, 224, 3))).abs().max() > 0.1, \
        "not the black image"

    embeds = id_embeds(clip=clip, uncond=uncond)
    layers = id_layers(encoder, embeds, "sd15")
    with torch.no_grad():
        negative = module.encode(torch.zeros(1, 512), reference_uncond)
        zero_hidden = module.encode(torch.zeros(1, 512), torch.zeros_like(reference_uncond))
        positive = module.encode(embeds.arcface, clip)
    for key in block_keys("sd15"):
        ku, vu = module.kv(key.key, negative)
        torch.testing.assert_close(layers[key.key].k_uncond, ku.float(), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(layers[key.key].v_uncond, vu.float(), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(layers[key.key].k_cond, module.kv(key.key, positive)[0].float(), rtol=1e-3,
                                   atol=1e-4)
    first = block_keys("sd15")[0].key
    assert not torch.allclose(layers[first].k_uncond, module.kv(first, zero_hidden)[0].float(), atol=1e-3), \
        "the negative is no longer the resampler of zero hidden states"


def test_plus_needs_the_unconditional_features(sd15):
    embeds = id_embeds(clip=torch.randn(1, 257, 1280))  # clip_hidden but no clip_hidden_uncond
    with pytest.raises(IDEncoderError, match="unconditional image.*IDFuse Face Embed"):
        build_guider(sd15, loaded_encoder("faceid_plus"), embeds)


# --- s_scale -----------------------------------------------------------------------------------------------


def test_s_scale_is_the_last_input_of_both_nodes_and_defaults_to_the_reference():
    for node in (IDFuseInfiniteIDGuider, IDFuseInfiniteIDSampler):
        inputs = node.INPUT_TYPES()
        assert list(inputs["optional"]) == ["s_scale"]
        kind, options = inputs["optional"]["s_scale"]
        assert kind == "FLOAT" and options["default"] == 1.0 and (options["min"], options["max"]) == (-1.0, 5.0)
        assert "PlusV2" in options["tooltip"] and "ignore" in options["tooltip"]


@pytest.mark.parametrize("kind", ["faceid_plusv2", "faceid_plus"])
def test_s_scale_reaches_plus_v2_and_only_changes_its_tokens(sd15, monkeypatch, kind):
    encoder = loaded_encoder(kind)
    embeds = id_embeds(clip=torch.randn(1, 257, 1280), uncond=torch.randn(1, 257, 1280))
    seen: list[float] = []
    cls = FaceIDPlusV2 if kind == "faceid_plusv2" else FaceIDPlus
    original = cls.encode

    def recording(self, module, face, clip, **options):
        seen.append(options.get("shortcut_scale"))
        return original(self, module, face, clip, **options)

    monkeypatch.setattr(cls, "encode", recording)
    build_guider(sd15, encoder, embeds, s_scale=2.5)
    assert seen == [2.5, 2.5], "positive and negative tokens both get s_scale"
    monkeypatch.undo()

    first = block_keys("sd15")[0].key
    low, high = (id_layers(encoder, embeds, "sd15", shortcut_scale=s)[first] for s in (0.0, 2.0))
    if kind == "faceid_plusv2":
        module = encoder.encoder
        weight = module.face_mapper.proj[0].weight
        with torch.no_grad():
            face_only = module.kv(first, module.face_mapper(embeds.arcface.to(weight.device, weight.dtype)))[0]
        torch.testing.assert_close(low.k_cond, face_only.float(), rtol=1e-3, atol=1e-4)  # s = 0: face tokens only
        assert not torch.allclose(low.k_cond, high.k_cond)
    else:
        assert torch.equal(low.k_cond, high.k_cond) and torch.equal(low.k_uncond, high.k_uncond)
