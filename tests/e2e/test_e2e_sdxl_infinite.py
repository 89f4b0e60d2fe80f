"""End to end: photo -> face analysis -> FaceID SDXL encoder -> Infinite-ID sampling on the random SDXL checkpoint
(the SDXL example workflow at 256 x 256), in a real ComfyUI server."""

from __future__ import annotations

import numpy as np
from comfy_env import PACK_ROOT
from PIL import Image

from .harness.workflow import load_workflow, override_inputs, ui_to_api

WORKFLOW = PACK_ROOT / "example_workflows" / "idfuse_sdxl_infinite_id.json"
SIZE = 256


def _node(api, class_type, **inputs):
    return next(i for i, n in api.items() if n["class_type"] == class_type
                and all(n["inputs"].get(k) == v for k, v in inputs.items()))


def test_e2e_sdxl_infinite_id_example_workflow(sdxl_checkpoint, comfy_client, sdxl_face_models):
    workflow = load_workflow(WORKFLOW)
    api = ui_to_api(workflow, comfy_client.object_info())
    assert api[_node(api, "EmptyLatentImage")]["inputs"]["width"] == 1024  # the example's size; shrunk below
    assert api[_node(api, "IDFuseLoadIDEncoder")]["inputs"]["encoder_name"].endswith("faceid_sdxl.bin")
    override_inputs(api, "CheckpointLoaderSimple", ckpt_name=sdxl_checkpoint.name)
    override_inputs(api, "EmptyLatentImage", width=SIZE, height=SIZE)
    override_inputs(api, "IDFuseInfiniteIDSampler", steps=2)
    outputs = comfy_client.run(api, timeout=1800)

    def image(node_id) -> np.ndarray:
        (item,) = outputs[node_id]["images"]
        return np.asarray(Image.open(comfy_client.output_path(item)))

    sampler = _node(api, "IDFuseInfiniteIDSampler")
    # The ID stream's image (SaveImage) and the text stream's (PreviewImage) come from the same sampler and noise.
    id_image = image(_node(api, "SaveImage", images=[_node(api, "VAEDecode", samples=[sampler, 0]), 0]))
    text_image = image(_node(api, "PreviewImage", images=[_node(api, "VAEDecode", samples=[sampler, 1]), 0]))
    assert id_image.shape == text_image.shape == (SIZE, SIZE, 3)
    assert not np.array_equal(id_image, text_image)
    face_preview = next(i for i, n in api.items() if n["class_type"] == "PreviewImage" and n["inputs"]["images"][1] == 1)
    assert image(face_preview).shape == (512, 512, 3)
