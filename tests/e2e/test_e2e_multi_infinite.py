"""End to end: two faces with regional Infinite-ID (Region Masks -> Combine ID Embeds x 2), in a real ComfyUI server."""

from __future__ import annotations

import copy

import numpy as np
from comfy_env import PACK_ROOT
from PIL import Image

from .harness.workflow import load_workflow, override_inputs, ui_to_api

WORKFLOW = PACK_ROOT / "example_workflows" / "idfuse_infinite_id_two_people.json"


def _node(api, class_type, **inputs):
    return next(i for i, n in api.items() if n["class_type"] == class_type
                and all(n["inputs"].get(k) == v for k, v in inputs.items()))


def _images(client, outputs, node_id) -> np.ndarray:
    return np.asarray(Image.open(client.output_path(outputs[node_id]["images"][0])))


def test_e2e_multi_infinite_two_people_workflow(comfy_client, comfy_dirs, sd15_checkpoint, face_models):
    import onnx_faces  # the synthetic detector finds its two template faces: Tom Hanks (face.png), the astronaut

    Image.open(comfy_dirs.input / "face.png").save(comfy_dirs.input / "person_left.png")
    Image.fromarray(onnx_faces.astronaut()).save(comfy_dirs.input / "person_right.png")
    info = comfy_client.object_info()
    for node in ("IDFuseCombineIDEmbeds", "IDFuseMixIDEmbeds", "IDFuseRegionMasks"):
        assert node in info and info[node]["description"], f"{node} is not registered"

    api = ui_to_api(load_workflow(WORKFLOW), info)
    override_inputs(api, "CheckpointLoaderSimple", ckpt_name=sd15_checkpoint.name)
    override_inputs(api, "EmptyLatentImage", width=96, height=64)
    override_inputs(api, "IDFuseRegionMasks", width=96, height=64)
    override_inputs(api, "IDFuseInfiniteIDSampler", steps=2)
    sampler = _node(api, "IDFuseInfiniteIDSampler")
    id_decode = _node(api, "VAEDecode", samples=[sampler, 0])
    text_decode = _node(api, "VAEDecode", samples=[sampler, 1])
    save = _node(api, "SaveImage", images=[id_decode, 0])
    text_preview = _node(api, "PreviewImage", images=[text_decode, 0])

    outputs = comfy_client.run(api, timeout=900)
    two_people, text = _images(comfy_client, outputs, save), _images(comfy_client, outputs, text_preview)
    assert two_people.shape == (64, 96, 3)
    assert not np.array_equal(two_people, text)

    # The same people in swapped halves: another ID stream, the same text stream.
    swapped = copy.deepcopy(api)
    masks = _node(swapped, "IDFuseRegionMasks")
    first = next(i for i, n in swapped.items() if n["class_type"] == "IDFuseCombineIDEmbeds" and "regions" not in n["inputs"])
    second = next(i for i, n in swapped.items() if n["class_type"] == "IDFuseCombineIDEmbeds" and "regions" in n["inputs"])
    swapped[first]["inputs"]["mask"], swapped[second]["inputs"]["mask"] = [masks, 1], [masks, 0]
    outputs = comfy_client.run(swapped, timeout=900)
    assert np.array_equal(_images(comfy_client, outputs, text_preview), text)
    assert not np.array_equal(_images(comfy_client, outputs, save), two_people)
