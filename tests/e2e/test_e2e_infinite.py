"""End to end: photo -> face analysis -> FaceID encoder -> Infinite-ID sampling, in a real ComfyUI server."""

from __future__ import annotations

import numpy as np
import pytest
from comfy_env import PACK_ROOT
from PIL import Image

from .harness.workflow import load_workflow, override_inputs, ui_to_api


@pytest.mark.parametrize("workflow", ["idfuse_infinite_id.json", "idfuse_infinite_id_styles.json"])
def test_e2e_infinite_id_example_workflows(comfy_client, sd15_checkpoint, face_models, workflow):
    api = ui_to_api(load_workflow(PACK_ROOT / "example_workflows" / workflow), comfy_client.object_info())
    override_inputs(api, "CheckpointLoaderSimple", ckpt_name=sd15_checkpoint.name)
    override_inputs(api, "EmptyLatentImage", width=64, height=64)
    override_inputs(api, "IDFuseInfiniteIDSampler", steps=2)
    outputs = comfy_client.run(api, timeout=900)

    by_title = {}
    for node_id, node_outputs in outputs.items():
        images = [np.asarray(Image.open(comfy_client.output_path(item))) for item in node_outputs.get("images", [])]
        by_title[node_id] = images
    samplers = [i for i, n in api.items() if n["class_type"] == "IDFuseInfiniteIDSampler"]
    saves = [i for i, n in api.items() if n["class_type"] == "SaveImage"]
    assert len(saves) == len(samplers) and all(by_title[i] and by_title[i][0].shape == (64, 64, 3) for i in saves)
    for sampler in samplers:
        # The ID stream's image (SaveImage) and the text stream's (PreviewImage) come from the same sampler.
        id_decode = next(i for i, n in api.items() if n["class_type"] == "VAEDecode" and n["inputs"]["samples"] == [sampler, 0])
        text_decode = next(i for i, n in api.items() if n["class_type"] == "VAEDecode" and n["inputs"]["samples"] == [sampler, 1])
        id_image = next(by_title[i][0] for i, n in api.items() if n["class_type"] == "SaveImage" and n["inputs"]["images"] == [id_decode, 0])
        text_image = next(by_title[i][0] for i, n in api.items() if n["class_type"] == "PreviewImage" and n["inputs"]["images"] == [text_decode, 0])
        assert not np.array_equal(id_image, text_image)
    face_preview = next(i for i, n in api.items() if n["class_type"] == "PreviewImage" and n["inputs"]["images"][1] == 1)
    assert by_title[face_preview][0].shape == (512, 512, 3)
