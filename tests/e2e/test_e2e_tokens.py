"""End to end: the identity-token example workflow in a real ComfyUI server."""

from __future__ import annotations

import copy

import numpy as np
from comfy_env import PACK_ROOT
from factories import make_id_tokens

from .harness.workflow import load_workflow, override_inputs, small_sampling, ui_to_api, without_identity

WORKFLOW = PACK_ROOT / "example_workflows" / "idfuse_tokens_basic.json"




def test_e2e_tokens_example_workflow(comfy_client, comfy_dirs, sd15_checkpoint):
    tokens_dir = comfy_dirs.model_folder("idfuse/tokens")
    make_id_tokens("sd15", scale=0.5).save(tokens_dir / "my_identity.safetensors")
    info = comfy_client.object_info()
    for node in ("IDFuseLoadIDTokens", "IDFuseEncodeWithID", "IDFuseApplyIDTokens"):
        assert node in info, f"{node} is not registered"
        assert info[node]["description"], f"{node} has no description"
    assert "my_identity.safetensors" in info["IDFuseLoadIDTokens"]["input"]["required"]["tokens_name"][0]

    api = small_sampling(ui_to_api(load_workflow(WORKFLOW), info), sd15_checkpoint.name, seed=7)
    with_identity = comfy_client.output_pixels(comfy_client.run(api))
    assert with_identity.shape == (64, 64, 3)

    # strength 0 gives exactly the plain prompt with the initialiser word, through the whole server.
    off = copy.deepcopy(api)
    override_inputs(off, "IDFuseApplyIDTokens", strength=0.0)
    without = comfy_client.output_pixels(comfy_client.run(off))
    assert not np.array_equal(with_identity, without)

    plain = without_identity(api)
    assert np.array_equal(comfy_client.output_pixels(comfy_client.run(plain)), without)


def test_e2e_tokens_clear_error_for_prompt_without_placeholder(comfy_client, comfy_dirs, sd15_checkpoint):
    from .harness.client import ExecutionFailed

    tokens_dir = comfy_dirs.model_folder("idfuse/tokens")
    make_id_tokens("sd15").save(tokens_dir / "my_identity.safetensors")
    api = small_sampling(ui_to_api(load_workflow(WORKFLOW), comfy_client.object_info()), sd15_checkpoint.name, seed=8)
    override_inputs(api, "IDFuseEncodeWithID", text="a photo of a person in a garden")
    try:
        comfy_client.run(api)
    except ExecutionFailed as failure:
        assert "does not contain the placeholder word 'sks'" in str(failure)
    else:
        raise AssertionError("a prompt without the placeholder must fail with a clear error")
