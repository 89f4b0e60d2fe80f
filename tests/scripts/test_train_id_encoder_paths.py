"""scripts/train_id_encoder.py end to end in this process, on the paths test_train_id_encoder.py does not run:
starting from an IP-Adapter FaceID-Plus / PlusV2 file (``--init``), ``--mixed-precision bf16`` on the CPU, and an
SDXL-topology checkpoint."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from ip_adapter_files import FITS_TEST_UNETS, write_faceid
from safetensors import safe_open
from script_launcher import imported_script
from tiny_checkpoint import (
    TINY_MODEL_CHANNELS,
    register_tiny_models,
    unregister_tiny_models,
    write_tiny_checkpoint,
    write_tiny_dataset,
)

from comfyui_idfuse.models.encoders import load_id_encoder
from comfyui_idfuse.models.faces.types import ARCFACE_W600K_512
from comfyui_idfuse.models.unet import block_keys

PACK = Path(__file__).resolve().parents[2]
SMALL_ENCODER = ["--clip-mapper-dim", "64", "--clip-mapper-depth", "1", "--face-hidden-dim", "64", "--ff-mult", "1",
                 "--num-clip-tokens", "2", "--num-face-tokens", "2"]
# Adam moves each weight by about the learning rate per step: the smallest one allowed, so one step leaves the
# initial weights within this tolerance (a random start is ~0.03 away).
TINY_LEARNING_RATE = 1e-7
INIT_TOLERANCE = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def script():
    with imported_script("train_id_encoder", "train_id_encoder_paths_under_test") as module:
        yield module


@pytest.fixture(scope="module")
def tiny_models():
    register_tiny_models()
    register_tiny_sdxl()
    yield
    unregister_tiny_sdxl()
    unregister_tiny_models()


@pytest.fixture(scope="module")
def sd15_checkpoint(tiny_models, tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sd15") / "tiny_sd15.safetensors")


@pytest.fixture(scope="module")
def arcface_data(tmp_path_factory):
    """512-wide face embeddings (insightface's space): what a FaceID-Plus face mapper reads."""
    return write_tiny_dataset(tmp_path_factory.mktemp("arcface") / "faces", [[2, 2], [2, 2]],
                              embedding_space=ARCFACE_W600K_512, width=512)


@pytest.fixture(scope="module")
def dlib_data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("dlib") / "faces", [[3, 2], [2, 3]])


def argv(checkpoint, data, output, *extra, steps: int = 2) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--data", str(data), "--output", str(output), "--cpu", "--steps",
            str(steps), "--save-every", "0", "--validate-every", "0", "--batch-size", "2", "--validation-identities",
            "1", "--log-every", "1", *extra]


def errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def exported(output: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(output / "idfuse_encoder.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["training"])


# --------------------------------------------------------------------------------------------- --init


@pytest.mark.parametrize("name", ["ip-adapter-faceid-plus_sd15.safetensors", "ip-adapter-faceid-plusv2_sd15.bin"])
def test_training_starts_from_the_converted_init_file(script, sd15_checkpoint, arcface_data, tmp_path, name):
    init = write_faceid(tmp_path / name, "faceid_plus", "sd15", FITS_TEST_UNETS, seed=5)
    source = load_id_encoder(init)
    output = tmp_path / "out"
    assert script.main(argv(sd15_checkpoint, arcface_data, output, "--init", str(init), "--learning-rate",
                            str(TINY_LEARNING_RATE), "--weight-decay", "0", steps=1)) == 0

    tensors, metadata = exported(output)
    assert metadata["init"] == name and metadata["steps"] == 1 and metadata["embedding_space"] == ARCFACE_W600K_512
    trained = load_id_encoder(output / "idfuse_encoder.safetensors")
    assert trained.kind == "idfuse" and trained.family == "sd15"
    for layer in block_keys("sd15"):
        for part in ("to_k", "to_v"):
            expected = getattr(source.projection(layer.key), part).weight.float()
            got = tensors[f"ip.{layer}.{part}.weight"]
            assert got.dtype == torch.float32
            assert torch.allclose(got, expected, atol=INIT_TOLERANCE), (layer, part)
    for name_, weight in source.face_mapper.state_dict().items():
        assert torch.allclose(tensors[f"face_mapper.{name_}"], weight.float(), atol=INIT_TOLERANCE), name_
    for name_, weight in source.clip_mapper.state_dict().items():
        assert torch.allclose(tensors[f"clip_mapper.{name_}"], weight.float(), atol=INIT_TOLERANCE), name_
    # the learned CLIP queries: the source's face tokens of the zero face (see models/encoders/convert.py)
    with torch.no_grad():
        queries = source.face_mapper(torch.zeros(1, 512, dtype=source.face_mapper.proj[0].weight.dtype)).float()
    assert torch.allclose(tensors["clip_mapper.latents"], queries, atol=1e-3)


def test_an_init_file_of_the_other_family_is_refused_naming_init(script, sd15_checkpoint, arcface_data, tmp_path,
                                                                 caplog):
    init = write_faceid(tmp_path / "ip-adapter-faceid-plusv2_sdxl.safetensors", "faceid_plus", "sdxl")
    output = tmp_path / "out"
    assert script.main(argv(sd15_checkpoint, arcface_data, output, "--init", str(init))) == 2
    assert f"--init {init} is for sdxl" in errors(caplog)
    assert not (output / "idfuse_encoder.safetensors").exists()


def test_an_init_file_reading_other_face_embeddings_is_refused_naming_init(script, sd15_checkpoint, dlib_data,
                                                                           tmp_path, caplog):
    init = write_faceid(tmp_path / "ip-adapter-faceid-plus_sd15.safetensors", "faceid_plus", "sd15", FITS_TEST_UNETS)
    assert script.main(argv(sd15_checkpoint, dlib_data, tmp_path / "out", "--init", str(init))) == 2
    assert f"--init {init}" in errors(caplog) and "512-wide" in errors(caplog)


# --------------------------------------------------------------------------------------------- bf16


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one state per process and refuses another mixed precision in it; a real run is one
    process, so each precision gets a fresh state here (and the next test the default one again)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_bf16_mixed_precision_on_the_cpu_trains_with_a_finite_loss_and_exports_float32(script, sd15_checkpoint,
                                                                                       dlib_data, tmp_path, caplog,
                                                                                       monkeypatch):
    from accelerate.state import AcceleratorState

    from comfyui_idfuse.models.training import encoder_trainer

    autocast_dtypes = []
    original_forward = encoder_trainer.EncoderTraining.forward

    def forward(self, batch, step):
        enabled = torch.is_autocast_enabled("cpu")
        autocast_dtypes.append(torch.get_autocast_dtype("cpu") if enabled else None)
        return original_forward(self, batch, step)

    monkeypatch.setattr(encoder_trainer.EncoderTraining, "forward", forward)
    output = tmp_path / "out"
    with caplog.at_level(logging.DEBUG, logger="idfuse.training"):
        assert script.main(argv(sd15_checkpoint, dlib_data, output, "--mixed-precision", "bf16",
                                *SMALL_ENCODER)) == 0
    assert autocast_dtypes == [torch.bfloat16, torch.bfloat16]  # the training forward ran under bf16 autocast
    losses = [float(m.group(1)) for r in caplog.records
              if (m := re.match(r"step \d+: loss (\S+), lr", r.getMessage()))]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    tensors, metadata = exported(output)
    assert metadata["settings"]["mixed_precision"] == "bf16" and metadata["steps"] == 2
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    # the weights moved (the step ran through the autocast forward and the optimiser)
    monkeypatch.undo()
    start_run = tmp_path / "start"
    AcceleratorState._reset_state(reset_partial_state=True)
    assert script.main(argv(sd15_checkpoint, dlib_data, start_run, "--learning-rate", str(TINY_LEARNING_RATE),
                            *SMALL_ENCODER, steps=1)) == 0
    start, _ = exported(start_run)
    assert any(not torch.allclose(tensors[k], start[k], atol=1e-5) for k in tensors)


# --------------------------------------------------------------------------------------------- SDXL


def register_tiny_sdxl() -> None:
    """Let ComfyUI's model detection recognise the tests' 32-channel SDXL UNet (factories.SDXL_UNET), as
    tiny_checkpoint.register_tiny_models does for SD1.5. Idempotent."""
    import comfy.supported_models as supported

    if any(getattr(config, "idfuse_tiny_sdxl", False) for config in supported.models):
        return

    class TinySDXL(supported.SDXL):
        idfuse_tiny_sdxl = True
        unet_config = {**supported.SDXL.unet_config, "model_channels": TINY_MODEL_CHANNELS,
                       "transformer_depth": [0, 0, 2, 2, 10, 10]}

        def clip_target(self, state_dict=None):
            return None  # no text encoder in the file

    supported.models.insert(0, TinySDXL)


def unregister_tiny_sdxl() -> None:
    import comfy.supported_models as supported

    supported.models[:] = [config for config in supported.models if not getattr(config, "idfuse_tiny_sdxl", False)]


@pytest.fixture(scope="module")
def sdxl_checkpoint(tiny_models, tmp_path_factory):
    import comfy.sd
    from factories import make_model

    path = tmp_path_factory.mktemp("sdxl") / "tiny_sdxl.safetensors"
    comfy.sd.save_checkpoint(str(path), make_model("sdxl", seed=0))
    return path


def test_an_sdxl_checkpoint_trains_and_exports_an_sdxl_encoder(script, sdxl_checkpoint, dlib_data, tmp_path):
    output = tmp_path / "out"
    assert script.main(argv(sdxl_checkpoint, dlib_data, output, *SMALL_ENCODER)) == 0
    tensors, metadata = exported(output)
    assert metadata["family"] == "sdxl" and metadata["steps"] == 2
    encoder = load_id_encoder(output / "idfuse_encoder.safetensors")
    assert encoder.family == "sdxl" and encoder.kind == "idfuse"
    assert len(block_keys("sdxl")) == 70  # every cross-attention layer of SDXL has its ID K/V
    for layer in block_keys("sdxl"):
        assert tensors[f"ip.{layer}.to_k.weight"].shape[1] == 2048, layer
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_an_sd15_init_file_is_refused_for_an_sdxl_checkpoint(script, sdxl_checkpoint, arcface_data, tmp_path,
                                                             caplog):
    init = write_faceid(tmp_path / "ip-adapter-faceid-plus_sd15.safetensors", "faceid_plus", "sd15", FITS_TEST_UNETS)
    assert script.main(argv(sdxl_checkpoint, arcface_data, tmp_path / "out", "--init", str(init))) == 2
    assert f"--init {init} is for sd15" in errors(caplog)
