"""End to end: two identities from token files in one prompt (the two-people example workflow) in a real ComfyUI."""

from __future__ import annotations

import copy

import numpy as np
from comfy_env import PACK_ROOT
from factories import make_id_tokens

from .harness.workflow import load_workflow, override_inputs, ui_to_api

WORKFLOW = PACK_ROOT / "example_workflows" / "idfuse_tokens_two_people.json"



def _api(client, dirs, checkpoint, second_placeholder="ohwx"):
    tokens_dir = dirs.model_folder("idfuse/tokens")
    # A file name of its own per placeholder: the server caches Load ID Tokens' output by its inputs.
    second_name = "person_b.safetensors" if second_placeholder == "ohwx" else f"person_b_{second_placeholder}.safetensors"
    make_id_tokens("sd15", num_stages=5, scale=0.5, seed=1).save(tokens_dir / "person_a.safetensors")
    make_id_tokens("sd15", num_stages=3, placeholder=second_placeholder, initializer="man", scale=0.5,
                   seed=2).save(tokens_dir / second_name)
    info = client.object_info()
    for node in ("IDFuseCombineIDTokens", "IDFuseRegionMasks"):
        assert node in info and info[node]["description"], f"{node} is not registered or has no description"
    api = ui_to_api(load_workflow(WORKFLOW), info)
    override_inputs(api, "CheckpointLoaderSimple", ckpt_name=checkpoint.name)
    override_inputs(api, "KSampler", steps=2, seed=5)
    override_inputs(api, "EmptyLatentImage", width=64, height=64)
    for node in api.values():
        if node["class_type"] == "IDFuseLoadIDTokens" and node["inputs"]["tokens_name"] == "person_b.safetensors":
            node["inputs"]["tokens_name"] = second_name
    return api


def test_e2e_multi_tokens_two_people_workflow(comfy_client, comfy_dirs, sd15_checkpoint):
    api = _api(comfy_client, comfy_dirs, sd15_checkpoint)
    combine = next(i for i, n in api.items() if n["class_type"] == "IDFuseCombineIDTokens")
    assert {"mask_a", "mask_b"} <= set(api[combine]["inputs"])  # the example shows the regions
    with_regions = comfy_client.output_pixels(comfy_client.run(api))
    assert with_regions.shape == (64, 64, 3)

    free = copy.deepcopy(api)
    del free[combine]["inputs"]["mask_a"], free[combine]["inputs"]["mask_b"]
    without_regions = comfy_client.output_pixels(comfy_client.run(free))
    assert not np.array_equal(with_regions, without_regions)

    off = copy.deepcopy(api)
    override_inputs(off, "IDFuseApplyIDTokens", strength=0.0)
    plain = comfy_client.output_pixels(comfy_client.run(off))
    assert not np.array_equal(plain, with_regions) and not np.array_equal(plain, without_regions)


def test_e2e_multi_tokens_same_placeholder_is_a_clear_error(comfy_client, comfy_dirs, sd15_checkpoint):
    from .harness.client import ExecutionFailed

    api = _api(comfy_client, comfy_dirs, sd15_checkpoint, second_placeholder="sks")
    try:
        comfy_client.run(api)
    except ExecutionFailed as failure:
        assert "both use the placeholder word 'sks'" in str(failure)
    else:
        raise AssertionError("two identities with the same placeholder must fail with a clear error")
