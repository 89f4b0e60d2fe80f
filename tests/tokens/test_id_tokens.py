"""The identity-token file: round trip, and clear errors for foreign, corrupt and mismatched files."""

from __future__ import annotations

import pytest
import torch
from factories import make_id_tokens
from safetensors.torch import save_file

from comfyui_idfuse.models.files import atomic_save_safetensors
from comfyui_idfuse.models.tokens.format import IDTokensError, load_id_tokens


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_round_trip(tmp_path, family):
    tokens = make_id_tokens(family, num_stages=3)
    tokens.generator = {"block.weight": torch.randn(4, 4)}
    path = tokens.save(tmp_path / "me.safetensors")
    loaded = load_id_tokens(path)
    assert (loaded.family, loaded.placeholder, loaded.initializer, loaded.num_stages) == (family, "sks", "person", 3)
    assert loaded.training == tokens.training
    for name in tokens.keys:
        assert torch.equal(loaded.keys[name], tokens.keys[name])
        assert torch.equal(loaded.values[name], tokens.values[name])
    assert torch.equal(loaded.generator["block.weight"], tokens.generator["block.weight"])
    assert loaded.source == "me.safetensors"


def test_save_is_atomic(tmp_path, monkeypatch):
    import comfyui_idfuse.models.files as module

    path = tmp_path / "me.safetensors"
    make_id_tokens().save(path)
    good = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_file", broken)
    with pytest.raises(OSError):
        make_id_tokens(seed=1).save(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["me.safetensors"]


def test_foreign_and_corrupt_files(tmp_path):
    foreign = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(IDTokensError, match="lora.safetensors: not an IDFuse identity-token file"):
        load_id_tokens(foreign)
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(IDTokensError, match="broken.safetensors: not a readable safetensors file"):
        load_id_tokens(corrupt)


def test_shape_and_family_mismatch(tmp_path):
    tokens = make_id_tokens("sd15")
    tokens.keys["clip_l"] = torch.zeros(5, 1024)
    path = tmp_path / "wide.safetensors"
    atomic_save_safetensors(tokens.state_dict(), path, tokens.metadata())
    with pytest.raises(IDTokensError, match=r"wide.safetensors: keys.clip_l has shape \(5, 1024\), expected \(5, 768\)"):
        load_id_tokens(path)

    xl = make_id_tokens("sdxl")
    xl.source = "xl.safetensors"
    with pytest.raises(IDTokensError, match="xl.safetensors were made for SDXL, but the model is SD1.5"):
        xl.check_family("sd15")

    missing_g = make_id_tokens("sdxl")
    del missing_g.values["clip_g"]
    with pytest.raises(IDTokensError, match=r"values has vectors for encoders \['clip_l'\]"):
        missing_g.validate()


def test_nan_and_bad_words_rejected():
    tokens = make_id_tokens()
    tokens.values["clip_l"][2, 5] = float("nan")
    with pytest.raises(IDTokensError, match="NaN"):
        tokens.validate()
    with pytest.raises(IDTokensError, match="placeholder word must be one word"):
        make_id_tokens(placeholder="two words").validate()


def _rewritten(tmp_path, name: str, metadata: dict[str, str] | None = None, tensors: dict | None = None):
    """A valid token file with some metadata entries or tensors replaced."""
    tokens = make_id_tokens()
    path = tmp_path / name
    save_file({**tokens.state_dict(), **(tensors or {})}, str(path), metadata={**tokens.metadata(), **(metadata or {})})
    return path


@pytest.mark.parametrize("field", ["format_version", "num_stages"])
def test_metadata_numbers_that_are_not_numbers(tmp_path, field):
    path = _rewritten(tmp_path, "odd.safetensors", metadata={field: "abc"})
    with pytest.raises(IDTokensError, match=rf"odd.safetensors: the metadata entry '{field}' is 'abc', not a whole number"):
        load_id_tokens(path)


def test_tensor_without_dimensions(tmp_path):
    path = _rewritten(tmp_path, "flat.safetensors", tensors={"keys.clip_l": torch.tensor(1.0)})
    with pytest.raises(IDTokensError, match=r"flat.safetensors: keys.clip_l is a 0-dimensional tensor"):
        load_id_tokens(path)
    path = _rewritten(tmp_path, "line.safetensors", tensors={"values.clip_l": torch.zeros(768)})
    with pytest.raises(IDTokensError, match=r"line.safetensors: values.clip_l is a 1-dimensional tensor of shape \(768,\)"):
        load_id_tokens(path)


def test_broken_metadata_entries_are_named(tmp_path):
    tokens = make_id_tokens()
    metadata = tokens.metadata()
    del metadata["placeholder"]
    path = tmp_path / "cut.safetensors"
    save_file(tokens.state_dict(), str(path), metadata=metadata)
    with pytest.raises(IDTokensError, match="cut.safetensors: the metadata has no 'placeholder' entry"):
        load_id_tokens(path)
    path = _rewritten(tmp_path, "json.safetensors", metadata={"training": "{not json"})
    with pytest.raises(IDTokensError, match="json.safetensors: the metadata entry 'training' is not valid JSON"):
        load_id_tokens(path)
    path = _rewritten(tmp_path, "list.safetensors", metadata={"training": "[1, 2]"})
    with pytest.raises(IDTokensError, match="list.safetensors: the metadata entry 'training' is a JSON list"):
        load_id_tokens(path)
