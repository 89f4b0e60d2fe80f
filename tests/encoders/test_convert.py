"""An IDFuse encoder initialised from an IP-Adapter FaceID-Plus / PlusV2 file: the copied weights are the source's,
the learned CLIP queries make the source's face tokens, it saves and loads as an IDFuse encoder, and what cannot
be converted (FaceID, another family, another embedding width) is refused."""

from __future__ import annotations

import pytest
import torch
from ip_adapter_files import write_faceid

from comfyui_idfuse.models.encoders import load_id_encoder
from comfyui_idfuse.models.encoders.convert import idfuse_from_ip_adapter
from comfyui_idfuse.models.errors import IDEncoderError
from comfyui_idfuse.models.faces.types import ARCFACE_GLINTR100_512, DLIB_RESNET_128
from comfyui_idfuse.models.unet import block_keys


@pytest.fixture(scope="module", params=["faceid-plus", "faceid-plusv2"])
def source(request, tmp_path_factory):
    path = write_faceid(tmp_path_factory.mktemp("ipa") / f"ip-adapter-{request.param}_sd15.safetensors",
                        "faceid_plus", "sd15", seed=1)
    return load_id_encoder(path)


def test_copies_every_weight_of_the_source(source):
    converted = idfuse_from_ip_adapter(source)
    assert converted.kind == "idfuse" and converted.family == source.family
    assert converted.embedding_space == source.embedding_space
    for name, tensor in source.face_mapper.state_dict().items():
        assert torch.equal(converted.face_mapper.state_dict()[name], tensor), name
    clip = converted.clip_mapper.state_dict()
    for name, tensor in source.clip_mapper.state_dict().items():
        assert torch.equal(clip[name], tensor), name
    assert set(clip) - set(source.clip_mapper.state_dict()) == {"latents"}
    for layer in block_keys(source.family):
        for part in ("to_k", "to_v"):
            copied = getattr(converted.projection(layer.key), part).weight
            assert torch.equal(copied, getattr(source.projection(layer.key), part).weight), (layer, part)
    assert converted.lora == {}


def test_copies_are_independent_of_the_source(source):
    converted = idfuse_from_ip_adapter(source)
    before = source.face_mapper.proj[0].weight.clone()
    with torch.no_grad():
        converted.face_mapper.proj[0].weight.add_(1.0)
    assert torch.equal(source.face_mapper.proj[0].weight, before)


def test_queries_are_the_face_tokens_of_the_mean_face(source):
    faces = torch.randn(5, 512)
    converted = idfuse_from_ip_adapter(source, query_faces=faces)
    with torch.no_grad():
        expected = source.face_mapper(faces.mean(0, keepdim=True))
        assert torch.allclose(converted.clip_mapper.latents, expected, atol=1e-6)
        # so the CLIP branch computes at step 0 what the source's resampler computes for the mean face
        clip = torch.randn(1, 257, 1280)
        tokens = converted.encode(faces.mean(0, keepdim=True), clip)
        assert tokens.shape == (1, 2 * source.face_mapper.num_tokens, 768)
        assert torch.allclose(tokens[:, source.face_mapper.num_tokens:],
                              source.clip_mapper(clip, latents=expected), atol=1e-5)
    default = idfuse_from_ip_adapter(source)
    with torch.no_grad():
        assert torch.allclose(default.clip_mapper.latents, source.face_mapper(torch.zeros(1, 512)), atol=1e-6)


def test_saves_and_loads_as_an_idfuse_encoder(source, tmp_path):
    converted = idfuse_from_ip_adapter(source)
    path = converted.save(tmp_path / "me.safetensors", training={"init": source.source})
    loaded = load_id_encoder(path)
    assert loaded.kind == "idfuse" and loaded.family == "sd15" and loaded.embedding_space == source.embedding_space
    for name, tensor in converted.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_refuses_faceid_without_clip_mapper(tmp_path):
    faceid = load_id_encoder(write_faceid(tmp_path / "ip-adapter-faceid_sd15.safetensors", "faceid", "sd15"))
    with pytest.raises(IDEncoderError, match="no CLIP mapper"):
        idfuse_from_ip_adapter(faceid)


def test_refuses_another_family(source):
    with pytest.raises(IDEncoderError, match="SDXL"):
        idfuse_from_ip_adapter(source, family="sdxl")
    assert idfuse_from_ip_adapter(source, family="sd15").family == "sd15"


def test_refuses_another_embedding_width_and_allows_another_space_of_the_same_width(source):
    with pytest.raises(IDEncoderError, match="128-wide"):
        idfuse_from_ip_adapter(source, embedding_space=DLIB_RESNET_128)
    assert idfuse_from_ip_adapter(source, embedding_space=ARCFACE_GLINTR100_512).embedding_space == \
        ARCFACE_GLINTR100_512
    with pytest.raises(IDEncoderError, match="embedding_space"):
        idfuse_from_ip_adapter(source, embedding_space="made-up")
