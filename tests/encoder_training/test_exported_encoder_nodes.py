"""An encoder exported by scripts/train_id_encoder.py (a 2-step run on the tiny SD1.5 checkpoint) is a working
Infinite-ID encoder: it loads through *IDFuse Load ID Encoder* from models/idfuse/encoders and drives both
*IDFuse Infinite-ID Sampler* and *IDFuse Infinite-ID Guider* (the guider through ComfyUI's sampling): finite
latents, an ID stream that is not the text stream and that follows the face."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from factories import make_model
from script_launcher import imported_script
from tiny_checkpoint import register_tiny_models, unregister_tiny_models, write_tiny_checkpoint, write_tiny_dataset

from comfyui_idfuse.models.faces.types import DLIB_RESNET_128
from comfyui_idfuse.nodes.encoders import IDFuseLoadIDEncoder
from comfyui_idfuse.nodes.glue.encoder_validation import reference_embedding
from comfyui_idfuse.nodes.glue.folders import ID_ENCODERS_FOLDER
from comfyui_idfuse.nodes.infinite_id import IDFuseInfiniteIDGuider, IDFuseInfiniteIDSampler

PACK = Path(__file__).resolve().parents[2]
ENCODER_FILE = "trained_by_the_script.safetensors"
SMALL_ENCODER = ["--clip-mapper-dim", "64", "--clip-mapper-depth", "1", "--face-hidden-dim", "64", "--ff-mult", "1",
                 "--num-clip-tokens", "2", "--num-face-tokens", "2"]
SETTINGS = {"id_weight": 1.0, "id_start_percent": 0.0, "id_end_percent": 1.0, "mixing": True, "mix_blocks": "all",
            "mix_start_percent": 0.0, "mix_end_percent": 1.0, "adain": "mean", "encoder_lora_strength": 0.0}
STEPS = 2
CFG = 5.0


@pytest.fixture(scope="module")
def exported_encoder(tmp_path_factory) -> str:
    """The script's exported encoder, copied into models/idfuse/encoders; its name in the loader's list."""
    import folder_paths

    root = tmp_path_factory.mktemp("trained")
    register_tiny_models()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checkpoint = write_tiny_checkpoint(root / "tiny_sd15.safetensors")  # factories.make_model("sd15", seed=0)
        data = write_tiny_dataset(root / "faces", [[2, 2], [2, 2]])
        with imported_script("train_id_encoder", "train_id_encoder_for_node_tests") as script:
            code = script.main(["--checkpoint", str(checkpoint), "--data", str(data), "--output", str(root / "run"),
                                "--cpu", "--steps", "2", "--save-every", "0", "--validate-every", "0",
                                "--batch-size", "2", "--validation-identities", "1", *SMALL_ENCODER])
    finally:
        torch.set_num_threads(threads)
        unregister_tiny_models()
    assert code == 0
    folder = Path(folder_paths.get_folder_paths(ID_ENCODERS_FOLDER)[0])
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "run" / "idfuse_encoder.safetensors", folder / ENCODER_FILE)
    return ENCODER_FILE


@pytest.fixture(scope="module")
def sd15():
    return make_model("sd15")  # the UNet of the tiny checkpoint the encoder was trained on


def face(seed: int):
    """ID_EMBEDS of the training data's kind: a dlib embedding, a face crop's CLIP features, the unconditional ones."""
    gen = torch.Generator().manual_seed(seed)
    return reference_embedding(torch.randn(128, generator=gen), DLIB_RESNET_128, torch.randn(257, 1280, generator=gen),
                               torch.randn(257, 1280, generator=torch.Generator().manual_seed(99)))


def conditioning(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def test_the_exported_encoder_is_listed_and_loads_as_an_idfuse_encoder(exported_encoder):
    from comfyui_idfuse.nodes.glue.id_encoders import encoder_choices

    assert exported_encoder in encoder_choices()
    (loaded,) = IDFuseLoadIDEncoder().load(exported_encoder)
    encoder = loaded.encoder
    assert (encoder.kind, encoder.family, encoder.embedding_space) == ("idfuse", "sd15", DLIB_RESNET_128)
    assert encoder.num_tokens == 4  # 2 face + 2 CLIP tokens, as trained


def run_sampler(model, encoder, id_embeds):
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    with torch.inference_mode():
        return IDFuseInfiniteIDSampler().sample(model, conditioning(1), conditioning(2), encoder, id_embeds, latent,
                                                seed=3, steps=STEPS, cfg=CFG, sampler_name="euler",
                                                scheduler="normal", denoise=1.0, **SETTINGS)


def test_the_sampler_node_runs_on_the_exported_encoder(exported_encoder, sd15):
    (encoder,) = IDFuseLoadIDEncoder().load(exported_encoder)
    ident_a, text_a = run_sampler(sd15, encoder, face(0))
    ident_b, text_b = run_sampler(sd15, encoder, face(1))
    assert ident_a["samples"].shape == (1, 4, 16, 16)
    assert torch.isfinite(ident_a["samples"]).all() and torch.isfinite(text_a["samples"]).all()
    assert not torch.allclose(ident_a["samples"], text_a["samples"], atol=1e-4)  # the ID stream is its own
    assert not torch.equal(ident_a["samples"], ident_b["samples"])  # and follows the face
    assert torch.equal(text_a["samples"], text_b["samples"])  # the text stream does not


def guided(model, encoder, id_embeds) -> torch.Tensor:
    """The guider node's output sampled by ComfyUI (comfy.samplers, as SamplerCustomAdvanced runs a GUIDER)."""
    import comfy.samplers

    (guider,) = IDFuseInfiniteIDGuider().build(model, conditioning(1), conditioning(2), encoder, id_embeds, CFG, True,
                                              **SETTINGS)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    with torch.inference_mode():
        return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0)


def test_the_guider_node_samples_through_comfyui_on_the_exported_encoder(exported_encoder, sd15):
    (encoder,) = IDFuseLoadIDEncoder().load(exported_encoder)
    out_a, out_b = guided(sd15, encoder, face(0)), guided(sd15, encoder, face(1))
    assert out_a.shape == (2, 4, 16, 16)  # the ID stream, then the text stream (return_text_stream)
    assert torch.isfinite(out_a).all()
    assert not torch.allclose(out_a[:1], out_a[1:], atol=1e-4)  # the ID stream is its own
    assert not torch.equal(out_a[:1], out_b[:1])  # and follows the face
    assert torch.equal(out_a[1:], out_b[1:])  # the text stream does not
