"""The Infinite-ID nodes with a (synthetic) IP-Adapter FaceID encoder: sampling, encoder LoRA, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from factories import make_model
from ip_adapter_files import FITS_TEST_UNETS, write_faceid

from comfyui_idfuse.models.infinite_id.settings import InfiniteIDSettings
from comfyui_idfuse.nodes.encoders import IDFuseLoadIDEncoder
from comfyui_idfuse.nodes.glue.lora import with_lora
from comfyui_idfuse.nodes.infinite_id import IDFuseInfiniteIDGuider, IDFuseInfiniteIDSampler

SETTINGS = {"id_weight": 1.0, "id_start_percent": 0.0, "id_end_percent": 1.0, "mixing": True, "mix_blocks": "all",
            "mix_start_percent": 0.0, "mix_end_percent": 1.0, "adain": "mean", "encoder_lora_strength": 0.0}


@pytest.fixture(scope="module")
def encoder():
    import folder_paths

    folder = folder_paths.get_folder_paths("ipadapter")[0]
    write_faceid(f"{folder}/ip-adapter-faceid_sd15_test.bin", "faceid", "sd15", FITS_TEST_UNETS)
    return IDFuseLoadIDEncoder().load("ipadapter/ip-adapter-faceid_sd15_test.bin")[0]


@pytest.fixture(scope="module")
def sd15():
    return make_model("sd15")


def embeds(seed=0):
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return SimpleNamespace(arcface=face, clip_hidden=None)


def conditioning(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def run_sampler(model, encoder, face, **overrides):
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    with torch.inference_mode():
        return IDFuseInfiniteIDSampler().sample(model, conditioning(1), conditioning(2), encoder, face, latent, seed=3,
                                                steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
                                                denoise=1.0, **{**SETTINGS, **overrides})


def test_sampler_runs_and_identity_changes_the_id_stream_only(sd15, encoder):
    ident_a, text_a = run_sampler(sd15, encoder, embeds(0))
    ident_b, text_b = run_sampler(sd15, encoder, embeds(1))
    assert torch.isfinite(ident_a["samples"]).all()
    assert torch.equal(text_a["samples"], text_b["samples"])
    assert not torch.equal(ident_a["samples"], ident_b["samples"])
    assert not torch.equal(ident_a["samples"], text_a["samples"])


def test_encoder_lora_patches_exactly_its_weights(sd15, encoder):
    lora = encoder.encoder.lora
    assert lora, "the synthetic FaceID file carries a LoRA"
    patched = with_lora(sd15, lora, 0.5)
    assert set(patched.patches) == set(lora)
    assert not sd15.patches
    _ident, text_plain = run_sampler(sd15, encoder, embeds(0))
    _ident, text_lora = run_sampler(sd15, encoder, embeds(0), encoder_lora_strength=0.5)
    assert not torch.equal(text_plain["samples"], text_lora["samples"])


def test_guider_node_builds_and_family_mismatch_is_clear(encoder):
    model = make_model("sd15")
    (guider,) = IDFuseInfiniteIDGuider().build(model, conditioning(1), conditioning(2), encoder, embeds(), 5.0, False,
                                              **SETTINGS)
    assert guider.cfg == 5.0
    with pytest.raises(ValueError, match="is for sd15, the model is sdxl"):
        IDFuseInfiniteIDGuider().build(make_model("sdxl"), conditioning(1), conditioning(2), encoder, embeds(), 5.0,
                                       False, **SETTINGS)


def test_settings_defaults_match_the_node_defaults():
    inputs = IDFuseInfiniteIDGuider.INPUT_TYPES()["required"]
    defaults = InfiniteIDSettings()
    assert inputs["id_weight"][1]["default"] == defaults.id_weight
    assert inputs["adain"][1]["default"] == defaults.adain == "mean"
    assert inputs["encoder_lora_strength"][1]["default"] == defaults.lora_strength
