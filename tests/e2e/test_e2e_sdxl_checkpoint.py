"""End to end: the random SDXL checkpoint of the harness is what ComfyUI takes for a real SDXL file."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness.checkpoints import available_memory_gib, check_checkpoint_loads, checkpoint_tensor_specs, read_metadata

CLIP_G = "conditioner.embedders.1.model."
# One more load of the SDXL checkpoint beside the server's (the load check peaked at 13.7 GiB on ComfyUI 0.8).
SDXL_LOAD_GIB = 15.0


def test_sdxl_key_table_is_the_single_file_layout(comfyui_path: Path) -> None:
    # Built on the meta device (no memory needed): what a real sd_xl_base_1.0.safetensors holds.
    specs = {spec.key: spec for spec in checkpoint_tensor_specs("sdxl", comfyui_path)}
    assert round(sum(spec.numel for spec in specs.values()) / 1e9, 2) == 3.47  # UNet 2.57 B, CLIP-L + G, VAE
    assert specs["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)  # SDXL's size conditioning
    assert specs["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape == (640, 2048)
    # CLIP-G in OpenCLIP's layout (fused q/k/v, text_projection as a bare matrix), CLIP-L in transformers'.
    assert specs[CLIP_G + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert specs[CLIP_G + "text_projection"].shape == (1280, 1280)
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight" in specs
    assert not any(key.startswith("cond_stage_model.") for key in specs)
    # Fills survive the renaming: norms start at one, biases at zero.
    assert specs[CLIP_G + "transformer.resblocks.0.ln_1.weight"].init == "ones"
    assert specs[CLIP_G + "transformer.resblocks.0.attn.in_proj_bias"].init == "zeros"
    assert specs[CLIP_G + "transformer.resblocks.0.attn.in_proj_weight"].init == "normal"


def test_sdxl_random_checkpoint_loads_as_sdxl_without_key_warnings(comfyui_path: Path, sdxl_checkpoint: Path) -> None:
    # A second copy of the model beside the server's: only when the machine has room for it.
    available = available_memory_gib()
    if available is not None and available < SDXL_LOAD_GIB:
        pytest.skip(f"loading the SDXL checkpoint beside the server needs ~{SDXL_LOAD_GIB:.0f} GiB, "
                    f"only {available:.1f} GiB available")
    assert read_metadata(sdxl_checkpoint)["idfuse_e2e"] == "random-sdxl"
    report = check_checkpoint_loads(sdxl_checkpoint, comfyui_path)
    assert (report.model_config, report.clip, report.vae) == ("SDXL", "SDXLClipModel", "AutoencoderKL")
    assert report.key_warnings == ()
