"""End to end: the SDXL identity-token example workflow (Encode With ID + Apply ID Tokens + KSampler) in a real
ComfyUI server, on the random SDXL checkpoint at 256 x 256."""

from __future__ import annotations

import copy

import numpy as np
from comfy_env import PACK_ROOT
from factories import make_id_tokens

from .harness.client import ExecutionFailed
from .harness.workflow import load_workflow, override_inputs, small_sampling, ui_to_api, without_identity

WORKFLOW = PACK_ROOT / "example_workflows" / "idfuse_sdxl_tokens.json"
SIZE = 256
TIMEOUT = 1800




def test_e2e_sdxl_tokens_example_workflow(sdxl_checkpoint, comfy_client, comfy_dirs):
    make_id_tokens("sdxl", scale=0.5).save(comfy_dirs.model_folder("idfuse/tokens") / "my_identity_sdxl.safetensors")
    workflow = load_workflow(WORKFLOW)
    # The example is made for SDXL's own size; the test shrinks it.
    (latent,) = [n for n in workflow["nodes"] if n["type"] == "EmptyLatentImage"]
    assert latent["widgets_values"][:2] == [1024, 1024]
    info = comfy_client.object_info()
    assert "my_identity_sdxl.safetensors" in info["IDFuseLoadIDTokens"]["input"]["required"]["tokens_name"][0]

    api = small_sampling(ui_to_api(workflow, info), sdxl_checkpoint.name, seed=7, size=SIZE)
    with_identity = comfy_client.output_pixels(comfy_client.run(api, timeout=TIMEOUT))
    assert with_identity.shape == (SIZE, SIZE, 3)

    # strength 0 gives exactly the plain prompt with the initialiser word (both text encoders, pooled output too).
    off = copy.deepcopy(api)
    override_inputs(off, "IDFuseApplyIDTokens", strength=0.0)
    without = comfy_client.output_pixels(comfy_client.run(off, timeout=TIMEOUT))
    assert not np.array_equal(with_identity, without)

    plain = without_identity(api)
    assert np.array_equal(comfy_client.output_pixels(comfy_client.run(plain, timeout=TIMEOUT)), without)


def test_e2e_sdxl_tokens_of_sd15_are_refused_on_sdxl(sdxl_checkpoint, comfy_client, comfy_dirs):
    make_id_tokens("sd15").save(comfy_dirs.model_folder("idfuse/tokens") / "sd15_identity.safetensors")
    api = small_sampling(ui_to_api(load_workflow(WORKFLOW), comfy_client.object_info()), sdxl_checkpoint.name,
                         seed=8, size=SIZE)
    override_inputs(api, "IDFuseLoadIDTokens", tokens_name="sd15_identity.safetensors")
    try:
        comfy_client.run(api, timeout=TIMEOUT)
    except ExecutionFailed as failure:
        message = str(failure)
        assert "SD1.5" in message and "SDXL" in message, message
    else:
        raise AssertionError("SD1.5 tokens on an SDXL model must fail with a clear error")
