"""The ID encoder: diffusers' processor order, IP-Adapter FaceID checkpoints of every kind and family,
our own format, clear errors, and the loader node."""

from __future__ import annotations

import functools
import os
import pickle
import re
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from factories import SD15_UNET, SDXL_UNET, make_model
from ip_adapter_files import (
    FITS_TEST_UNETS,
    REAL,
    faceid_checkpoint,
    flatten,
    image_ip_adapter_checkpoint,
    save_checkpoint,
    write_faceid,
)
from safetensors.torch import save_file

from comfyui_idfuse.models.encoders import (
    Checkpoint,
    build_id_encoder,
    create_idfuse_encoder,
    is_plus_v2_name,
    load_id_encoder,
    read_checkpoint,
)
from comfyui_idfuse.models.encoders.processor_order import cross_attention_processors, processors
from comfyui_idfuse.models.errors import IDEncoderError
from comfyui_idfuse.models.unet import CONTEXT_DIM, block_keys

FAMILIES = ("sd15", "sdxl")
FACEID_KINDS = ("faceid", "faceid_plus", "faceid_plusv2")
# The released file names (h94/IP-Adapter-FaceID); "plusv2" in the name is what marks PlusV2.
RELEASED_NAME = {"faceid": "ip-adapter-faceid_{}", "faceid_plus": "ip-adapter-faceid-plus_{}",
                 "faceid_plusv2": "ip-adapter-faceid-plusv2_{}"}
NUM_CROSS_ATTENTION = {"sd15": 16, "sdxl": 70}
ATTENTION_WEIGHT = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$")
# Processor number -> ComfyUI layer and attention, as ComfyUI_IPAdapter_plus enumerates them
# (SD1.5: inputs 1-8 = processors 0-11, outputs 3-11 = 12-29, middle = 30-31; SDXL: inputs 0-47,
# outputs 48-119, middle 120-139): an independent check of diffusers' order.
KNOWN_PROCESSORS = {
    "sd15": [(0, ("input", 1, 0), "attn1"), (13, ("output", 3, 0), "attn2"), (31, ("middle", 0, 0), "attn2")],
    "sdxl": [(3, ("input", 4, 1), "attn2"), (48, ("output", 0, 0), "attn1"), (139, ("middle", 0, 9), "attn2")],
}


def unet_weight(key: tuple, attention: str, projection: str) -> str:
    """ComfyUI's name of an attention weight: the SpatialTransformer is submodule 1 of its block."""
    block, block_id, index = key[:3]
    where = "middle_block" if block == "middle" else f"{block}_blocks.{block_id}"
    return f"diffusion_model.{where}.1.transformer_blocks.{index}.{attention}.{projection}.weight"


def image_proj_weights(ckpt: Checkpoint, prefix: str = "image_proj.") -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): t.float() for k, t in ckpt.tensors.items() if k.startswith(prefix)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    """Write each synthetic checkpoint once per module: (kind, family, suffix) -> path."""
    folder = tmp_path_factory.mktemp("ip-adapter")
    written: dict[tuple, Path] = {}

    def get(kind: str, family: str, suffix: str = ".bin") -> Path:
        if (kind, family, suffix) not in written:
            path = folder / (RELEASED_NAME[kind].format(family) + suffix)
            written[kind, family, suffix] = write_faceid(path, kind, family)
        return written[kind, family, suffix]

    return get


@functools.cache
def comfy_unet_shapes(family: str) -> dict[str, torch.Size]:
    """Weight shapes of ComfyUI's own UNet at the family's real widths, built on the meta device."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = dict(SD15_UNET, model_channels=320) if family == "sd15" else \
        dict(SDXL_UNET, model_channels=320, num_head_channels=64)
    unet = UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
    return {f"diffusion_model.{k}": v.shape for k, v in unet.state_dict().items()}


# ------------------------------------------------------------------------------ processor order


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_order_maps_onto_the_block_table(family):
    procs, cross = processors(family), cross_attention_processors(family)
    assert processors(family) is procs, "cached"
    assert len(cross) == NUM_CROSS_ATTENTION[family] and len(procs) == 2 * len(cross)
    assert [p.number for p in procs] == list(range(len(procs)))
    # attn1 then attn2 of the same transformer: to_k_ip sits at the odd numbers.
    for self_attention, cross_attention in zip(procs[::2], procs[1::2], strict=True):
        assert (self_attention.attention, cross_attention.attention) == ("attn1", "attn2")
        assert self_attention.layer == cross_attention.layer
    assert [p.number for p in cross] == list(range(1, 2 * len(cross), 2))
    # One-to-one onto the block table, in diffusers' order: down blocks, up blocks, middle last
    # (the order ComfyUI_IPAdapter_plus hard-codes).
    part = {"input": 0, "output": 1, "middle": 2}
    assert [p.layer for p in cross] == sorted(block_keys(family), key=lambda k: (part[k.block], k.block_id, k.index))
    middle = [p.layer.key for p in cross if p.layer.block == "middle"]
    assert middle == [("middle", 0, i) for i in range(len(middle))] and len(middle) == (1 if family == "sd15" else 10)
    width = {"sd15": {1: 320, 2: 640, 4: 1280, 8: 1280}, "sdxl": {2: 640, 4: 1280}}[family]
    assert all(p.hidden_size == width[p.layer.downscale] for p in procs)


# ------------------------------------------------------------------------------ IP-Adapter files


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", FACEID_KINDS)
def test_every_kind_and_family_loads_using_every_key(checkpoint_file, kind, family):
    ckpt = read_checkpoint(checkpoint_file(kind, family))
    encoder = build_id_encoder(ckpt)
    assert ckpt.used == set(ckpt.tensors) == set(flatten(faceid_checkpoint(kind, family)))
    assert (encoder.kind, encoder.family, encoder.num_tokens) == (kind, family, 4)
    assert encoder.needs_clip_vision == (kind != "faceid")

    # Every cross-attention layer, the middle block's included, projects with its own file weights.
    tokens = torch.randn(1, 4, CONTEXT_DIM[family])
    for p in cross_attention_processors(family):
        k, v = encoder.kv(p.layer.key, tokens)
        torch.testing.assert_close(k, tokens @ ckpt.tensors[f"ip_adapter.{p.number}.to_k_ip.weight"].float().T)
        torch.testing.assert_close(v, tokens @ ckpt.tensors[f"ip_adapter.{p.number}.to_v_ip.weight"].float().T)

    # The LoRA targets exactly the attention projections of ComfyUI's UNet of the family...
    unet_attention = {n for n in comfy_unet_shapes(family) if ATTENTION_WEIGHT.search(n)}
    assert set(encoder.lora) == unet_attention
    # ... and processors land on the layers ComfyUI_IPAdapter_plus puts them on.
    for number, key, attention in KNOWN_PROCESSORS[family]:
        for lora, projection in (("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_out_lora", "to_out.0")):
            pair = encoder.lora[unet_weight(key, attention, projection)]
            assert pair["down"].equal(ckpt.tensors[f"ip_adapter.{number}.{lora}.down.weight"].float())
            assert pair["up"].equal(ckpt.tensors[f"ip_adapter.{number}.{lora}.up.weight"].float())
        if attention == "attn2":
            assert encoder.projection(key).to_v.weight.equal(ckpt.tensors[f"ip_adapter.{number}.to_v_ip.weight"].float())


@pytest.mark.parametrize("family", FAMILIES)
def test_real_widths_fit_comfyui_unet(family):
    """At the released widths (LoRA rank 128), on the meta device: shapes match ComfyUI's real-size UNet."""
    name = f"ip-adapter-faceid-plusv2_{family}.bin"
    ckpt = Checkpoint(name, flatten(faceid_checkpoint("faceid_plusv2", family, REAL, seed=None, device="meta")))
    encoder = build_id_encoder(ckpt)
    assert encoder.kind == "faceid_plusv2" and ckpt.used == set(ckpt.tensors)
    shapes = comfy_unet_shapes(family)
    for target, pair in encoder.lora.items():
        assert pair["down"].shape == (128, shapes[target][1]) and pair["up"].shape == (shapes[target][0], 128), target
    for layer in block_keys(family):
        assert encoder.projection(layer).to_k.weight.shape == shapes[unet_weight(layer, "attn2", "to_k")], layer
    resampler = encoder.clip_mapper
    assert (len(resampler.layers), resampler.layers[0][0].heads) == (4, CONTEXT_DIM[family] // 64)


def test_small_files_fit_the_test_unets(tmp_path):
    """FITS_TEST_UNETS files patch tests/factories' small UNets: same names and shapes."""
    encoder = load_id_encoder(write_faceid(tmp_path / "ip-adapter-faceid_sd15.bin", "faceid", "sd15", FITS_TEST_UNETS))
    weights = make_model("sd15").model.state_dict()
    for target, pair in encoder.lora.items():
        assert (pair["up"] @ pair["down"]).shape == weights[target].shape, target
    for layer in block_keys("sd15"):
        assert encoder.projection(layer).to_k.weight.shape == weights[unet_weight(layer, "attn2", "to_k")].shape


@pytest.mark.parametrize(("kind", "family"), [*((k, "sd15") for k in FACEID_KINDS), ("faceid_plusv2", "sdxl")])
def test_safetensors_layout_loads_the_same(checkpoint_file, kind, family):
    from_bin = load_id_encoder(checkpoint_file(kind, family, ".bin"))
    from_safetensors = load_id_encoder(checkpoint_file(kind, family, ".safetensors"))
    assert from_safetensors.kind == kind
    a, b = from_bin.state_dict(), from_safetensors.state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert from_bin.lora.keys() == from_safetensors.lora.keys()
    assert all(from_bin.lora[n]["up"].equal(from_safetensors.lora[n]["up"]) for n in from_bin.lora)


def test_faceid_without_lora_loads(tmp_path):
    """FaceID files without LoRA (FaceID-Portrait has none) give an encoder with an empty LoRA."""
    encoder = load_id_encoder(write_faceid(tmp_path / "portrait.bin", "faceid", "sd15", lora=False))
    assert encoder.kind == "faceid" and encoder.lora == {}


def test_plus_v2_is_told_by_name(tmp_path):
    assert all(map(is_plus_v2_name, ["ip-adapter-faceid-plusv2_sd15.bin", "FaceID_Plus_V2.safetensors", "plus-v2.bin"]))
    assert not any(map(is_plus_v2_name, ["ip-adapter-faceid-plus_sd15.bin", "faceid_sdxl.bin"]))
    path = write_faceid(tmp_path / "my-face-adapter.bin", "faceid_plus", "sd15")
    assert load_id_encoder(path).kind == "faceid_plus"
    assert load_id_encoder(path, plus_v2=True).kind == "faceid_plusv2"


# ------------------------------------------------------------------------------ encode


def _face_reference(w: dict, face: torch.Tensor, context: int) -> torch.Tensor:
    hidden = F.gelu(F.linear(face, w["proj.0.weight"], w["proj.0.bias"]))
    tokens = F.linear(hidden, w["proj.2.weight"], w["proj.2.bias"]).reshape(face.shape[0], -1, context)
    return F.layer_norm(tokens, (context,), w["norm.weight"], w["norm.bias"])


def _resampler_reference(w: dict, latents: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """IP-Adapter's FacePerceiverResampler, written out: scale dim_head^-1/4 on q and k, softmax in float."""
    dim = latents.shape[-1]
    x = F.linear(clip, w["proj_in.weight"], w["proj_in.bias"])
    depth = len({k.split(".")[1] for k in w if k.startswith("layers.")})
    for i in range(depth):
        p = f"layers.{i}."
        xn = F.layer_norm(x, (dim,), w[p + "0.norm1.weight"], w[p + "0.norm1.bias"])
        ln = F.layer_norm(latents, (dim,), w[p + "0.norm2.weight"], w[p + "0.norm2.bias"])
        q = F.linear(ln, w[p + "0.to_q.weight"])
        k, v = F.linear(torch.cat([xn, ln], dim=1), w[p + "0.to_kv.weight"]).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (-1, 64)).transpose(1, 2) for t in (q, k, v))  # heads of 64
        scale = 64 ** -0.25
        weights = ((q * scale) @ (k * scale).transpose(-2, -1)).float().softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        latents = latents + F.linear(out, w[p + "0.to_out.weight"])
        h = F.layer_norm(latents, (dim,), w[p + "1.0.weight"], w[p + "1.0.bias"])
        latents = latents + F.linear(F.gelu(F.linear(h, w[p + "1.1.weight"])), w[p + "1.3.weight"])
    out = F.linear(latents, w["proj_out.weight"], w["proj_out.bias"])
    return F.layer_norm(out, (out.shape[-1],), w["norm_out.weight"], w["norm_out.bias"])


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_matches_ip_adapter(checkpoint_file, family):
    context = CONTEXT_DIM[family]
    ckpt = read_checkpoint(checkpoint_file("faceid_plus", family))
    face, clip = torch.randn(2, 512), torch.randn(2, 257, 1280)
    face_tokens = _face_reference(image_proj_weights(ckpt), face, context)
    plus_tokens = _resampler_reference(image_proj_weights(ckpt, "image_proj.perceiver_resampler."), face_tokens, clip)

    plus = build_id_encoder(ckpt)
    out = plus.encode(face, clip)
    assert out.shape == (2, 4, context)
    torch.testing.assert_close(out, plus_tokens, atol=1e-4, rtol=1e-4)
    faceid = read_checkpoint(checkpoint_file("faceid", family))
    torch.testing.assert_close(build_id_encoder(faceid).encode(face),
                               _face_reference(image_proj_weights(faceid), face, context))
    v2 = load_id_encoder(checkpoint_file("faceid_plus", family), plus_v2=True)
    torch.testing.assert_close(v2.encode(face, clip, shortcut_scale=0.7), face_tokens + 0.7 * plus_tokens,
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(IDEncoderError, match="needs CLIP vision hidden states"):
        plus.encode(face)
    with pytest.raises(IDEncoderError, match=r"face embeddings must be \(batch, 512\)"):
        plus.encode(torch.randn(2, 768), clip)
    with pytest.raises(IDEncoderError, match=r"CLIP hidden states must be \(2, tokens, 1280\)"):
        plus.encode(face, torch.randn(2, 257, 1024))


# ------------------------------------------------------------------------------ our format


def _small_idfuse(family: str):
    hidden = {k: 8 * k.downscale for k in block_keys(family)}
    return create_idfuse_encoder(family, hidden, num_face_tokens=2, num_clip_tokens=3, face_hidden_dim=32,
                                 clip_mapper_dim=64, clip_mapper_depth=1, ff_mult=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_own_format_round_trip(tmp_path, family):
    encoder = _small_idfuse(family)
    path = encoder.save(tmp_path / "me.safetensors", training={"steps": 3})
    ckpt = read_checkpoint(path)
    loaded = build_id_encoder(ckpt)
    assert ckpt.used == set(ckpt.tensors)
    assert ckpt.metadata["format"] == "idfuse.id_encoder" and ckpt.metadata["num_clip_tokens"] == "3"
    assert (loaded.kind, loaded.family, loaded.num_tokens, loaded.needs_clip_vision) == ("idfuse", family, 5, True)
    face, clip = torch.randn(2, 512), torch.randn(2, 257, 1280)
    tokens = encoder.encode(face, clip)
    assert tokens.shape == (2, 5, CONTEXT_DIM[family])
    assert torch.equal(loaded.encode(face, clip), tokens)
    assert torch.equal(loaded.encode(face, clip)[:, :2], encoder.face_mapper(face)), "face tokens first"
    for layer in block_keys(family):
        assert all(torch.equal(a, b) for a, b in zip(loaded.kv(layer.key, tokens), encoder.kv(layer.key, tokens),
                                                       strict=True))


def test_own_format_errors(tmp_path):
    encoder = _small_idfuse("sd15")
    with pytest.raises(IDEncoderError, match="keep using its original file"):
        load_id_encoder(write_faceid(tmp_path / "ip-adapter-faceid_sd15.bin", "faceid", "sd15")).save(tmp_path / "x")
    tensors = read_checkpoint(encoder.save(tmp_path / "me.safetensors")).tensors
    meta = encoder.metadata()
    save_file(tensors, str(tmp_path / "new.safetensors"), {**meta, "format_version": "9"})
    with pytest.raises(IDEncoderError, match="new.safetensors: format version 9 is newer"):
        load_id_encoder(tmp_path / "new.safetensors")
    save_file(tensors, str(tmp_path / "liar.safetensors"), {**meta, "num_clip_tokens": "4"})
    with pytest.raises(IDEncoderError, match="num_clip_tokens='4' but the weights make 3"):
        load_id_encoder(tmp_path / "liar.safetensors")
    missing = {k: v for k, v in tensors.items() if k != "ip.middle.0.0.to_v.weight"}
    save_file(missing, str(tmp_path / "cut.safetensors"), meta)
    with pytest.raises(IDEncoderError, match="cut.safetensors: tensor 'ip.middle.0.0.to_v.weight' is missing"):
        load_id_encoder(tmp_path / "cut.safetensors")


# ------------------------------------------------------------------------------ errors


class _RunsCode:
    """Unpickling this would call os.system: the attack weights_only=True exists to stop."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unknown_and_corrupt_files(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(IDEncoderError, match=r"lora.safetensors is neither an IP-Adapter FaceID .*image_proj.proj.0"
                                             r".weight.* nor an IDFuse encoder .*Found keys \['lora_unet_x"):
        load_id_encoder(lora)
    tokens = tmp_path / "tokens.safetensors"
    save_file({"keys.clip_l": torch.zeros(5, 768)}, str(tokens), {"format": "idfuse.id_tokens"})
    with pytest.raises(IDEncoderError, match="Found metadata format='idfuse.id_tokens'"):
        load_id_encoder(tokens)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(IDEncoderError, match="broken.safetensors: not a readable safetensors file"):
        load_id_encoder(tmp_path / "broken.safetensors")
    (tmp_path / "broken.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(IDEncoderError, match="broken.bin: not a readable PyTorch checkpoint"):
        load_id_encoder(tmp_path / "broken.bin")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(IDEncoderError, match="notes.txt: unsupported file type '.txt'"):
        load_id_encoder(tmp_path / "notes.txt")


def test_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = faceid_checkpoint("faceid", "sd15")
    torch.save({**checkpoint, "extra": _RunsCode(marker)}, tmp_path / "evil.bin")
    with pytest.raises(IDEncoderError, match="evil.bin: refused to load: it contains Python objects other than tensors"):
        load_id_encoder(tmp_path / "evil.bin")
    assert not marker.exists()
    # Plain values pass weights_only but are not tensors either.
    torch.save({**checkpoint, "step": 5}, tmp_path / "step.bin")
    with pytest.raises(IDEncoderError, match="step.bin: entry 'step' is of type int, not a tensor"):
        load_id_encoder(tmp_path / "step.bin")


# PyTorch's advice on a refused file: loading it with weights_only=False would run its code.
UNSAFE_ADVICE = ("weights_only", "will likely succeed", "Re-running", "trusted source")
# How PyTorch 2.4-2.5 worded the refusal (2.6+ is what the installed torch says).
OLD_REFUSAL = ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
               "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted "
               "source.\n Please file an issue with the following so that we can make `weights_only=True` compatible "
               "with your use case: WeightsUnpickler error: Unsupported global: GLOBAL posix.system was not an allowed "
               "global by default.")


def test_refusal_does_not_advise_loading_unsafely(tmp_path, monkeypatch):
    torch.save({"x": _RunsCode(tmp_path / "code-ran")}, tmp_path / "evil.bin")
    with pytest.raises(IDEncoderError) as refused:
        load_id_encoder(tmp_path / "evil.bin")
    message = str(refused.value)
    assert "refused to load" in message and "system" in message, message  # what it refers to stays
    assert not [advice for advice in UNSAFE_ADVICE if advice in message], message
    assert refused.value.__cause__ is None and refused.value.__suppress_context__, "traceback shows no advice"

    def old_torch_load(*args, **kwargs):
        raise pickle.UnpicklingError(OLD_REFUSAL)

    monkeypatch.setattr(torch, "load", old_torch_load)
    with pytest.raises(IDEncoderError) as refused:
        load_id_encoder(tmp_path / "evil.bin")
    message = str(refused.value)
    assert "(It refers to posix.system.)" in message and not [a for a in UNSAFE_ADVICE if a in message], message


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_empty_file_says_it_is_empty(tmp_path, suffix):
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    with pytest.raises(IDEncoderError, match=f"empty{suffix}: the file is empty \\(0 bytes\\).*download it again"):
        load_id_encoder(tmp_path / f"empty{suffix}")


def test_width_mismatch_names_the_encoder_file(checkpoint_file):
    path = checkpoint_file("faceid", "sd15")
    encoder = load_id_encoder(path)
    widths = {layer.key: encoder.projection(layer).to_k.out_features for layer in block_keys("sd15")}
    encoder.check_layer_widths(widths)  # fits
    wrong = {**widths, ("input", 1, 0): 320}
    with pytest.raises(IDEncoderError, match=rf"ID encoder {re.escape(path.name)} \(IP-Adapter FaceID, SD1.5\): its "
                                             rf"ID keys/values do not fit this model's cross-attention widths "
                                             rf"\(input.1.0: {widths['input', 1, 0]} != 320\)"):
        encoder.check_layer_widths(wrong)
    # The encoder's own layer checks name it too.
    face = encoder.face_mapper
    with pytest.raises(IDEncoderError, match=r"ID encoder mine.safetensors \(IP-Adapter FaceID\): ID cross-attention "
                                             r"must cover the 16 cross-attention layers of SD1.5; missing"):
        type(encoder)(encoder.encoder_kind, "sd15", face, None, {("input", 1, 0): 8}, source="mine.safetensors")


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_non_faceid_ip_adapter_is_rejected(tmp_path, suffix):
    path = save_checkpoint(image_ip_adapter_checkpoint("sd15"), tmp_path / f"ip-adapter_sd15{suffix}")
    with pytest.raises(IDEncoderError, match=r"ip-adapter_sd15.* is an IP-Adapter \(CLIP image embedding\), not a "
                                             r"FaceID checkpoint.*Use IP-Adapter FaceID"):
        load_id_encoder(path)
    plus = image_ip_adapter_checkpoint("sd15")
    plus["image_proj"] = {"latents": torch.zeros(1, 16, 768), "proj_in.weight": torch.zeros(768, 1280)}
    with pytest.raises(IDEncoderError, match=r"is an IP-Adapter Plus / Plus-Face"):
        load_id_encoder(save_checkpoint(plus, tmp_path / f"ip-adapter-plus-face_sd15{suffix}"))


def test_damaged_faceid_files(tmp_path):
    def damaged(name: str, change) -> Path:
        checkpoint = faceid_checkpoint("faceid", "sd15")
        change(checkpoint["image_proj"], checkpoint["ip_adapter"])
        return save_checkpoint(checkpoint, tmp_path / name)

    path = damaged("no-v.bin", lambda image, ip: ip.pop("31.to_v_ip.weight"))
    with pytest.raises(IDEncoderError, match="no-v.bin: tensor 'ip_adapter.31.to_v_ip.weight' is missing"):
        load_id_encoder(path)
    path = damaged("extra.bin", lambda image, ip: ip.update({"0.to_k_ip.weight": torch.zeros(8, 768)}))
    with pytest.raises(IDEncoderError, match=r"extra.bin: has to_k_ip for 17 processors \(\[0, 1, 3, 5\]"):
        load_id_encoder(path)
    path = damaged("bias.bin", lambda image, ip: ip.update({"5.to_k_ip.bias": torch.zeros(8)}))
    with pytest.raises(IDEncoderError, match=r"bias.bin: has tensors that IP-Adapter FaceID checkpoints do not have: "
                                             r"\['ip_adapter.5.to_k_ip.bias'\] \(1 in all\)"):
        load_id_encoder(path)
    path = damaged("scale.bin", lambda image, ip: image.update({"scale": torch.ones(1)}))
    with pytest.raises(IDEncoderError, match=r"scale.bin \(IP-Adapter FaceID, SD1.5\) image_proj: the weights do not "
                                             r"fit together.*Unexpected key\(s\) in state_dict: \"scale\""):
        load_id_encoder(path)
    path = damaged("sd2.bin", lambda image, ip: ip.update({"1.to_k_ip.weight": torch.zeros(8, 1024)}))
    with pytest.raises(IDEncoderError, match=r"sd2.bin: ip_adapter.1.to_k_ip.weight takes a 1024-wide context"):
        load_id_encoder(path)
    path = damaged("lora.bin", lambda image, ip: ip.update({"0.to_q_lora.up.weight": torch.zeros(8, 5)}))
    with pytest.raises(IDEncoderError, match=r"lora.bin: LoRA ip_adapter.0.to_q_lora.down/up have shapes"):
        load_id_encoder(path)
    path = damaged("kv.bin", lambda image, ip: ip.update({"1.to_v_ip.weight": torch.zeros(9, 768)}))
    with pytest.raises(IDEncoderError, match=r"kv.bin: ID cross-attention: the weights do not fit together"):
        load_id_encoder(path)


# ------------------------------------------------------------------------------ node


def test_loader_node_lists_and_loads_both_folders():
    import comfy.model_management
    import folder_paths

    from comfyui_idfuse.nodes.encoders import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, IDFuseLoadIDEncoder
    from comfyui_idfuse.nodes.glue.id_encoders import LoadedIDEncoder

    assert NODE_CLASS_MAPPINGS == {"IDFuseLoadIDEncoder": IDFuseLoadIDEncoder}
    assert NODE_DISPLAY_NAME_MAPPINGS == {"IDFuseLoadIDEncoder": "IDFuse Load ID Encoder"}
    assert IDFuseLoadIDEncoder.CATEGORY == "IDFuse/Infinite-ID"
    assert {".safetensors", ".bin"} <= folder_paths.folder_names_and_paths["idfuse_encoders"][1]
    tag = uuid.uuid4().hex[:8]
    own = _small_idfuse("sd15").save(Path(folder_paths.get_folder_paths("idfuse_encoders")[0]) / f"me-{tag}.safetensors")
    ip_adapter = write_faceid(Path(folder_paths.get_folder_paths("ipadapter")[0]) / f"faceid-plusv2-{tag}.bin",
                              "faceid_plusv2", "sd15")
    try:
        inputs = IDFuseLoadIDEncoder.INPUT_TYPES()["required"]
        assert all("tooltip" in options for _type, options in inputs.values())
        choices = inputs["encoder_name"][0]
        assert own.name in choices and f"ipadapter/{ip_adapter.name}" in choices
        for name, kind in ((own.name, "idfuse"), (f"ipadapter/{ip_adapter.name}", "faceid_plusv2")):
            (loaded,) = IDFuseLoadIDEncoder().load(name)
            assert isinstance(loaded, LoadedIDEncoder) and loaded.source == name
            assert loaded.patcher.model is loaded.encoder and loaded.encoder.kind == kind
            comfy.model_management.load_models_gpu([loaded.patcher])
            assert loaded.encoder.encode(torch.randn(1, 512), torch.randn(1, 257, 1280)).shape[:2] == (1, 5 if
                                                                                                      kind == "idfuse" else 4)
        with pytest.raises(IDEncoderError, match="'nope.bin' not found in models/idfuse/encoders or models/ipadapter"):
            IDFuseLoadIDEncoder().load("nope.bin")
    finally:
        own.unlink()
        ip_adapter.unlink()
