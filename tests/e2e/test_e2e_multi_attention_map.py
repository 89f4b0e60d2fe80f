"""End to end: the attention-map example workflow (a token prompt) in a real ComfyUI server: heat maps per word,
the face-share table, the sampled image unchanged, and a re-run with another seed never shows the old record."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from comfy_env import PACK_ROOT
from factories import make_id_tokens
from PIL import Image

from .harness.client import ComfyClient
from .harness.workflow import load_workflow, override_inputs, small_sampling, ui_to_api

WORKFLOW = PACK_ROOT / "example_workflows" / "idfuse_attention_map.json"


@pytest.fixture()
def client(comfy_server):
    """The server's client, waiting longer for an answer: on a busy CPU the server can take over a minute to
    answer a history poll while it samples (the default is 60 s)."""
    return ComfyClient(comfy_server.url, dirs=comfy_server.dirs, log_tail=comfy_server.log_tail, request_timeout=300.0)


def _node(api, class_type):
    return next(i for i, n in api.items() if n["class_type"] == class_type)


def _images(client, outputs, node_id):
    return [np.asarray(Image.open(client.output_path(item))) for item in outputs[node_id]["images"]]



def test_e2e_multi_attention_map_example_workflow(client, comfy_dirs, sd15_checkpoint):
    make_id_tokens("sd15", scale=0.5).save(comfy_dirs.model_folder("idfuse/tokens") / "my_identity.safetensors")
    info = client.object_info()
    for node in ("IDFuseAttentionMap", "IDFuseShowAttentionMap"):
        assert node in info and info[node]["description"], f"{node} is not registered or has no description"
    api = small_sampling(ui_to_api(load_workflow(WORKFLOW), info), sd15_checkpoint.name, seed=7, steps=4)
    save, heat, shares = _node(api, "SaveImage"), _node(api, "PreviewImage"), _node(api, "PreviewAny")

    outputs = client.run(api, timeout=900)
    (picture,) = _images(client, outputs, save)
    heat_maps = _images(client, outputs, heat)
    assert picture.shape == (64, 64, 3) and len(heat_maps) == 2  # words "sks, hat", one image
    assert all(h.shape == (64, 64, 3) for h in heat_maps) and not np.array_equal(heat_maps[0], heat_maps[1])
    assert "Attention inside each face box" in str(outputs[shares])

    # Without the attention-map nodes the server samples the same picture, bit for bit.
    plain = copy.deepcopy(api)
    attention = _node(plain, "IDFuseAttentionMap")
    plain[_node(plain, "KSampler")]["inputs"]["model"] = plain[attention]["inputs"]["model"]
    for node_id in (attention, _node(plain, "IDFuseShowAttentionMap"), heat, shares, _node(plain, "IDFuseLoadFaceAnalysis")):
        del plain[node_id]
    (plain_picture,) = _images(client, client.run(plain, timeout=900), save)
    assert np.array_equal(picture, plain_picture)

    # Another seed: the Attention Map node is cached (same inputs), the sampling runs again and the heat maps are
    # those of the new run alone: equal to a run in which the node itself ran again.
    reseeded = small_sampling(copy.deepcopy(api), sd15_checkpoint.name, seed=8, steps=4)
    cached_maps = _images(client, client.run(reseeded, timeout=900), heat)
    fresh = copy.deepcopy(reseeded)
    override_inputs(fresh, "IDFuseAttentionMap", words="sks,hat")  # the same words: the node runs anew
    fresh_maps = _images(client, client.run(fresh, timeout=900), heat)
    assert all(np.array_equal(a, b) for a, b in zip(cached_maps, fresh_maps, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(cached_maps, heat_maps, strict=True))
