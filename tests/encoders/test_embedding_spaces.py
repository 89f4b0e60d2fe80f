"""Which face embedding space each ID encoder expects, how IDFuse files record it, and the refusal of
embeddings of another recogniser or width."""

from __future__ import annotations

import logging

import pytest
import torch
from ip_adapter_files import write_faceid
from safetensors.torch import save_file

from comfyui_idfuse.models.encoders import create_idfuse_encoder, kind_named, load_id_encoder, read_checkpoint
from comfyui_idfuse.models.errors import IDEncoderError
from comfyui_idfuse.models.faces.types import (
    ARCFACE_GLINTR100_512,
    ARCFACE_W600K_512,
    DLIB_RESNET_128,
    EMBEDDING_SPACES,
)
from comfyui_idfuse.models.unet import block_keys


def small_idfuse(embedding_space: str = ARCFACE_W600K_512):
    hidden = {k: 8 * k.downscale for k in block_keys("sd15")}
    return create_idfuse_encoder("sd15", hidden, num_face_tokens=2, num_clip_tokens=3, face_hidden_dim=32,
                                 clip_mapper_dim=64, clip_mapper_depth=1, ff_mult=1, embedding_space=embedding_space)


def test_the_spaces_are_named_once_with_their_widths():
    assert {name: space.width for name, space in EMBEDDING_SPACES.items()} == {
        ARCFACE_W600K_512: 512, ARCFACE_GLINTR100_512: 512, DLIB_RESNET_128: 128}
    assert "buffalo_l" in EMBEDDING_SPACES[ARCFACE_W600K_512].how_to_load
    assert "antelopev2" in EMBEDDING_SPACES[ARCFACE_GLINTR100_512].how_to_load


@pytest.mark.parametrize("kind", ["faceid", "faceid_plus", "faceid_plusv2"])
def test_faceid_kinds_expect_buffalo_l_embeddings(tmp_path, kind):
    assert kind_named(kind).embedding_space == ARCFACE_W600K_512
    name = "ip-adapter-faceid-plusv2_sd15.bin" if kind == "faceid_plusv2" else f"{kind}_sd15.bin"
    encoder = load_id_encoder(write_faceid(tmp_path / name, kind, "sd15"))
    assert encoder.kind == kind and encoder.embedding_space == ARCFACE_W600K_512


def test_idfuse_files_record_their_space(tmp_path):
    dlib = small_idfuse(DLIB_RESNET_128)
    assert dlib.face_mapper.embedding_dim == 128, "the space's width is the face mapper's input"
    path = dlib.save(tmp_path / "dlib.safetensors")
    assert read_checkpoint(path).metadata["embedding_space"] == DLIB_RESNET_128
    loaded = load_id_encoder(path)
    assert loaded.embedding_space == DLIB_RESNET_128
    assert loaded.encode(torch.randn(1, 128), torch.randn(1, 257, 1280)).shape == (1, 5, 768)
    with pytest.raises(IDEncoderError, match="Unknown embedding_space 'facenet'"):
        small_idfuse("facenet")


def test_idfuse_file_without_a_space_is_read_as_w600k_and_says_so(tmp_path, caplog):
    path = small_idfuse().save(tmp_path / "old.safetensors")
    ckpt = read_checkpoint(path)
    old_metadata = {k: v for k, v in ckpt.metadata.items() if k != "embedding_space"}
    save_file(ckpt.tensors, str(tmp_path / "old.safetensors"), old_metadata)
    with caplog.at_level(logging.INFO, logger="idfuse.encoders"):
        encoder = load_id_encoder(tmp_path / "old.safetensors")
    assert encoder.embedding_space == ARCFACE_W600K_512
    assert any("old.safetensors has no embedding_space" in r.getMessage() and ARCFACE_W600K_512 in r.getMessage()
               for r in caplog.records)


def test_a_space_that_does_not_fit_the_face_mapper_is_refused(tmp_path):
    path = small_idfuse().save(tmp_path / "liar.safetensors")
    ckpt = read_checkpoint(path)
    save_file(ckpt.tensors, str(path), {**ckpt.metadata, "embedding_space": DLIB_RESNET_128})
    with pytest.raises(IDEncoderError, match=r"liar.safetensors.*512-wide embeddings.*dlib-resnet-128.*128 wide"):
        load_id_encoder(path)


def test_another_recognisers_embeddings_are_refused_naming_both_and_the_fix(tmp_path):
    encoder = load_id_encoder(write_faceid(tmp_path / "ip-adapter-faceid_sd15.bin", "faceid", "sd15"))
    encoder.check_face_embedding(ARCFACE_W600K_512, 512, "insightface buffalo_l")  # the right one passes
    with pytest.raises(IDEncoderError) as caught:
        encoder.check_face_embedding(ARCFACE_GLINTR100_512, 512, "insightface antelopev2")
    message = str(caught.value)
    for expected in ("ip-adapter-faceid_sd15.bin", ARCFACE_W600K_512, ARCFACE_GLINTR100_512,
                     "insightface antelopev2", "Load buffalo_l in IDFuse Load Face Analysis"):
        assert expected in message


def test_an_embedding_of_another_width_is_refused_before_any_matmul(tmp_path):
    encoder = load_id_encoder(write_faceid(tmp_path / "ip-adapter-faceid_sd15.bin", "faceid", "sd15"))
    with pytest.raises(IDEncoderError, match=r"takes 512-wide face embeddings .* 128-wide ones of dlib-resnet-128 "
                                             r".*made by dlib HOG.*Load buffalo_l"):
        encoder.check_face_embedding(DLIB_RESNET_128, 128, "dlib HOG")
    with pytest.raises(IDEncoderError, match="128-wide"):  # a width mismatch even where the space is unnamed
        encoder.check_face_embedding(None, 128)


def test_an_unknown_space_is_let_through_with_a_warning(tmp_path, caplog):
    encoder = load_id_encoder(write_faceid(tmp_path / "ip-adapter-faceid_sd15.bin", "faceid", "sd15"))
    with caplog.at_level(logging.WARNING, logger="idfuse.encoders"):
        encoder.check_face_embedding("insightface-my_recogniser", 512, "insightface")
    assert any("insightface-my_recogniser" in r.getMessage() and "cannot check" in r.getMessage()
               for r in caplog.records)
