"""The registry of ID-encoder kinds: every kind recognises exactly its own files, a file of no kind is
refused with what was expected, and a kind added to ENCODER_KINDS is found by the loader with no
other change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ip_adapter_files import image_ip_adapter_checkpoint, save_checkpoint, write_faceid
from safetensors.torch import save_file

from comfyui_idfuse.models.encoders import (
    ENCODER_KINDS,
    Checkpoint,
    EncoderKind,
    IDEncoder,
    create_idfuse_encoder,
    kind_named,
    kind_names,
    load_id_encoder,
    read_checkpoint,
)
from comfyui_idfuse.models.encoders import kinds as kinds_package
from comfyui_idfuse.models.encoders.modules import FaceMapper, PerceiverResampler
from comfyui_idfuse.models.errors import IDEncoderError
from comfyui_idfuse.models.unet import CONTEXT_DIM, block_keys

KIND_OF_FILE = {  # file name -> the kind it is
    "ip-adapter-faceid_sd15.bin": "faceid",
    "ip-adapter-faceid_sdxl.safetensors": "faceid",
    "ip-adapter-faceid-plus_sd15.bin": "faceid_plus",
    "ip-adapter-faceid-plus_sd15.safetensors": "faceid_plus",
    "ip-adapter-faceid-plusv2_sd15.bin": "faceid_plusv2",
    "ip-adapter-faceid-plusv2_sdxl.safetensors": "faceid_plusv2",
    "ip-adapter-faceid-portrait_sd15.bin": "faceid",  # no LoRA
    "me.safetensors": "idfuse",
}
TOY_FORMAT = "toy.encoder"


def _small_idfuse(family: str = "sd15") -> IDEncoder:
    hidden = {k: 8 * k.downscale for k in block_keys(family)}
    return create_idfuse_encoder(family, hidden, num_face_tokens=2, num_clip_tokens=3, face_hidden_dim=32,
                                 clip_mapper_dim=64, clip_mapper_depth=1, ff_mult=1)


@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("kinds")
    files = {}
    for name, kind in KIND_OF_FILE.items():
        if kind == "idfuse":
            files[name] = _small_idfuse().save(folder / name)
        else:
            family = "sdxl" if "sdxl" in name else "sd15"
            files[name] = write_faceid(folder / name, kind, family, lora="portrait" not in name)
    return files


@pytest.fixture(scope="module")
def foreign_files(tmp_path_factory) -> dict[str, Path]:
    """Files that are no ID encoder: a plain IP-Adapter, a LoRA, a token file."""
    folder = tmp_path_factory.mktemp("foreign")
    lora, tokens = folder / "lora.safetensors", folder / "tokens.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(lora))
    save_file({"keys.clip_l": torch.zeros(5, 768)}, str(tokens), {"format": "idfuse.id_tokens"})
    return {"ip-adapter_sd15.bin": save_checkpoint(image_ip_adapter_checkpoint("sd15"), folder / "ip-adapter_sd15.bin"),
            "lora.safetensors": lora, "tokens.safetensors": tokens}


def test_kinds_have_distinct_names():
    names = [k.name for k in ENCODER_KINDS]
    assert names == ["faceid", "faceid_plus", "faceid_plusv2", "idfuse"]
    assert len(set(kind_names().values())) == len(names) and len({k.expected for k in ENCODER_KINDS}) == len(names)
    assert all(kind_named(n).name == n for n in names)
    with pytest.raises(IDEncoderError, match=r"Unknown ID encoder kind 'nope'; expected one of \['faceid'"):
        kind_named("nope")


def test_encoder_takes_a_kind_or_its_name():
    face = FaceMapper(2, 768, hidden_dim=16)
    hidden = {k: 8 for k in block_keys("sd15")}
    by_name = IDEncoder("faceid", "sd15", face, None, hidden, source="x.bin")
    assert by_name.kind == "faceid" and by_name.encoder_kind is kind_named("faceid") and not by_name.needs_clip_vision
    with pytest.raises(IDEncoderError, match=r"x.bin \(IP-Adapter FaceID-Plus\): IP-Adapter FaceID-Plus encoders "
                                             r"need a CLIP mapper"):
        IDEncoder("faceid_plus", "sd15", face, None, hidden, source="x.bin")
    given_queries = PerceiverResampler(64, 1, 1, 64, 768)
    with pytest.raises(IDEncoderError, match="IDFuse CLIP mappers have learned queries, but this one has none"):
        IDEncoder("idfuse", "sd15", face, given_queries, hidden)


def test_every_kind_recognises_exactly_its_own_files(encoder_files):
    for name, path in encoder_files.items():
        ckpt = read_checkpoint(path)
        recognised_by = [k.name for k in ENCODER_KINDS if k.recognises(ckpt)]
        assert recognised_by == [KIND_OF_FILE[name]], name
        assert ckpt.used == set(), "recognising takes no tensor"
        encoder = load_id_encoder(path)
        assert encoder.kind == KIND_OF_FILE[name] and encoder.encoder_kind is kind_named(encoder.kind)


def test_plus_v2_option_overrides_the_name(encoder_files):
    plus = read_checkpoint(encoder_files["ip-adapter-faceid-plus_sd15.bin"])
    v2 = read_checkpoint(encoder_files["ip-adapter-faceid-plusv2_sd15.bin"])
    assert [k.name for k in ENCODER_KINDS if k.recognises(plus, plus_v2=True)] == ["faceid_plusv2"]
    assert [k.name for k in ENCODER_KINDS if k.recognises(v2, plus_v2=False)] == ["faceid_plus"]
    # The option means nothing to the other kinds' files.
    faceid = read_checkpoint(encoder_files["ip-adapter-faceid_sd15.bin"])
    assert [k.name for k in ENCODER_KINDS if k.recognises(faceid, plus_v2=True)] == ["faceid"]


def test_foreign_files_are_refused_with_what_was_expected(foreign_files):
    for name, path in foreign_files.items():
        assert not any(k.recognises(read_checkpoint(path)) for k in ENCODER_KINDS), name
        with pytest.raises(IDEncoderError) as refused:
            load_id_encoder(path)
        message = str(refused.value)
        assert message.startswith(name), message
        if name == "ip-adapter_sd15.bin":  # an IP-Adapter says which one it is, and lists the kinds
            assert "is an IP-Adapter (CLIP image embedding), not a FaceID checkpoint" in message
            assert all(k.display_name in message for k in ENCODER_KINDS), message
        else:
            assert all(k.expected in message for k in ENCODER_KINDS), message


def test_loaded_note_says_how_plus_was_told(encoder_files):
    plus = load_id_encoder(encoder_files["ip-adapter-faceid-plus_sd15.bin"])
    assert "rename it to contain 'plusv2'" in plus.encoder_kind.loaded_note(plus)
    for name in ("ip-adapter-faceid-plusv2_sd15.bin", "ip-adapter-faceid_sd15.bin", "me.safetensors"):
        encoder = load_id_encoder(encoder_files[name])
        assert encoder.encoder_kind.loaded_note(encoder) is None, name


# ------------------------------------------------------------------------------ adding a kind


class ToyKind(EncoderKind):
    """Face tokens doubled, no CLIP mapper: tensors face.* and ip.<layer>.to_k/to_v.weight."""

    name = "toy"
    display_name = "Toy encoder"
    expected = f"a toy encoder (metadata format={TOY_FORMAT!r})"
    needs_clip_vision = False

    def recognises(self, checkpoint: Checkpoint, **options) -> bool:
        return checkpoint.metadata.get("format") == TOY_FORMAT

    def build(self, checkpoint: Checkpoint) -> IDEncoder:
        family = checkpoint.metadata["model_family"]
        face = FaceMapper.from_weights(checkpoint.take_prefix("face."), CONTEXT_DIM[family], checkpoint.name)
        ip = {layer: (checkpoint.take(f"ip.{layer}.to_k.weight"), checkpoint.take(f"ip.{layer}.to_v.weight"))
              for layer in block_keys(family)}
        return IDEncoder.from_weights(self, family, face, None, ip, {}, checkpoint.name)

    def encode(self, encoder, face_embeds, clip_hidden, **options):
        return 2 * encoder.face_mapper(face_embeds)


def _write_toy(path: Path, source: IDEncoder) -> Path:
    tensors = {f"face.{n}": t for n, t in source.face_mapper.state_dict().items()}
    for layer in block_keys(source.family):
        tensors[f"ip.{layer}.to_k.weight"] = source.projection(layer).to_k.weight.detach()
        tensors[f"ip.{layer}.to_v.weight"] = source.projection(layer).to_v.weight.detach()
    save_file(tensors, str(path), {"format": TOY_FORMAT, "model_family": source.family})
    return path


def test_a_kind_added_to_the_list_is_found_by_the_loader(tmp_path, monkeypatch, foreign_files):
    source = _small_idfuse()
    path = _write_toy(tmp_path / "toy.safetensors", source)
    with pytest.raises(IDEncoderError, match="toy.safetensors is neither"):
        load_id_encoder(path)

    monkeypatch.setattr(kinds_package, "ENCODER_KINDS", [*kinds_package.ENCODER_KINDS, ToyKind()])
    encoder = load_id_encoder(path)
    assert (encoder.kind, encoder.family, encoder.needs_clip_vision, encoder.num_tokens) == ("toy", "sd15", False, 2)
    face = torch.randn(3, 512)
    torch.testing.assert_close(encoder.encode(face), 2 * source.face_mapper(face))
    tokens = encoder.encode(face)
    for layer in block_keys("sd15"):
        torch.testing.assert_close(encoder.kv(layer.key, tokens), source.kv(layer.key, tokens))
    assert kind_names()["toy"] == "Toy encoder" and kind_named("toy").name == "toy"
    with pytest.raises(IDEncoderError, match="toy.safetensors is Toy encoder: keep using its original file"):
        encoder.save(tmp_path / "again.safetensors")
    # The new kind is among what is expected of a file of no kind.
    with pytest.raises(IDEncoderError, match=r"nor a toy encoder \(metadata format='toy.encoder'\)"):
        load_id_encoder(foreign_files["lora.safetensors"])


def test_two_kinds_recognising_one_file_is_an_error(monkeypatch, encoder_files):
    class Greedy(ToyKind):
        name, display_name = "greedy", "Greedy"

        def recognises(self, checkpoint, **options):
            return True

    monkeypatch.setattr(kinds_package, "ENCODER_KINDS", [*kinds_package.ENCODER_KINDS, Greedy()])
    with pytest.raises(IDEncoderError, match="me.safetensors is recognised as IDFuse and as Greedy"):
        load_id_encoder(encoder_files["me.safetensors"])
