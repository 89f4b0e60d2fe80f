"""Smoke tests of the e2e infrastructure.

The ``ui_to_api`` tests need no server and run everywhere; the others start one ComfyUI server
per session (``comfy_server``) and skip when no full ComfyUI is available.
"""

from __future__ import annotations

import copy
import logging
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from .harness.checkpoints import key_warnings
from .harness.client import ComfyClient, ExecutionFailed, PromptRejected
from .harness.dirs import PACK_LINK_NAME
from .harness.process import ComfyServer, import_failures
from .harness.workflow import strip_meta, ui_to_api

pytestmark = pytest.mark.e2e

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# --------------------------------------------------------------------------------------------
# ui_to_api on a hand-written graph (no server)
# --------------------------------------------------------------------------------------------


def _combo(*values: str, **options: Any) -> list[Any]:
    return [list(values), options] if options else [list(values)]


FAKE_OBJECT_INFO: dict[str, Any] = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": _combo("a.safetensors", "b.safetensors")}},
        "input_order": {"required": ["ckpt_name"]},
        "display_name": "Load Checkpoint",
    },
    "CLIPTextEncode": {
        "input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}},
        "input_order": {"required": ["text", "clip"]},
    },
    "EmptyLatentImage": {
        "input": {"required": {"width": ["INT", {"default": 512}], "height": ["INT", {}], "batch_size": ["INT", {}]}},
        "input_order": {"required": ["width", "height", "batch_size"]},
    },
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL"], "seed": ["INT", {"control_after_generate": True}], "steps": ["INT", {}],
            "cfg": ["FLOAT", {}], "sampler_name": _combo("euler", "dpmpp_2m"), "scheduler": _combo("normal", "karras"),
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
            "denoise": ["FLOAT", {}],
        }},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]},
    },
    "LatentUpscale": {
        "input": {"required": {"samples": ["LATENT"], "upscale_method": _combo("nearest-exact", "bilinear"),
                               "width": ["INT", {}], "height": ["INT", {}], "crop": _combo("disabled", "center")}},
        "input_order": {"required": ["samples", "upscale_method", "width", "height", "crop"]},
    },
    "VAEDecode": {
        "input": {"required": {"samples": ["LATENT"], "vae": ["VAE"]}},
        "input_order": {"required": ["samples", "vae"]},
    },
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                  "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}},
        "input_order": {"required": ["images", "filename_prefix"], "hidden": ["prompt", "extra_pnginfo"]},
    },
    "PrimitiveInt": {
        "input": {"required": {"value": ["INT", {"control_after_generate": True}]}},
        "input_order": {"required": ["value"]},
    },
    # A combo asking for a control widget (control + filter list follow it); no input_order.
    "FakeChooser": {
        "input": {"required": {"choice": _combo("a", "b", "c", control_after_generate=True), "count": ["INT", {}]},
                  "optional": {"scale": ["FLOAT", {}], "image": ["IMAGE"]}},
    },
    # forceInput: no widget now; old workflows still kept a value for it.
    "FakeForced": {
        "input": {"required": {"a": ["INT", {}]}, "optional": {"b": ["INT", {"forceInput": True}], "c": ["FLOAT", {}]}},
        "input_order": {"required": ["a"], "optional": ["b", "c"]},
    },
}


def _node(node_id: int, type_: str, widgets: list[Any] | None = None, inputs: list[dict[str, Any]] | None = None,
          outputs: list[str] | None = None, mode: int = 0) -> dict[str, Any]:
    node: dict[str, Any] = {"id": node_id, "type": type_, "mode": mode, "inputs": inputs or [],
                            "outputs": [{"name": t, "type": t, "links": []} for t in outputs or []]}
    if widgets is not None:
        node["widgets_values"] = widgets
    return node


def _in(name: str, type_: str, link: int | None, widget: bool = False) -> dict[str, Any]:
    slot: dict[str, Any] = {"name": name, "type": type_, "link": link}
    if widget:
        slot["widget"] = {"name": name}
    return slot


def _hand_written_ui_workflow() -> dict[str, Any]:
    nodes = [
        _node(4, "CheckpointLoaderSimple", ["b.safetensors"], outputs=["MODEL", "CLIP", "VAE"]),
        _node(10, "Reroute", None, [_in("", "*", 3)], ["CLIP"]),
        _node(6, "CLIPTextEncode", ["a cat"], [_in("clip", "CLIP", 4), _in("text", "STRING", None, True)],
              ["CONDITIONING"]),
        _node(7, "CLIPTextEncode", ["overridden by the primitive"],
              [_in("clip", "CLIP", 5), _in("text", "STRING", 6, True)], ["CONDITIONING"]),
        _node(11, "PrimitiveNode", ["blurry"], outputs=["STRING"]),
        _node(5, "EmptyLatentImage", [512, 768, 1], outputs=["LATENT"]),
        _node(13, "LatentUpscale", ["nearest-exact", 1024, 1024, "disabled"], [_in("samples", "LATENT", 7)],
              ["LATENT"], mode=4),
        _node(12, "PrimitiveInt", [25, "increment"], outputs=["INT"]),
        _node(3, "KSampler", [42, "randomize", 20, 7.5, "dpmpp_2m", "karras", 1.0], [
            _in("model", "MODEL", 1), _in("positive", "CONDITIONING", 10), _in("negative", "CONDITIONING", 11),
            _in("latent_image", "LATENT", 8), _in("seed", "INT", None, True), _in("steps", "INT", 9, True),
        ], ["LATENT"]),
        _node(8, "VAEDecode", None, [_in("samples", "LATENT", 12), _in("vae", "VAE", 13)], ["IMAGE"]),
        _node(9, "SaveImage", ["smoke"], [_in("images", "IMAGE", 14)]),
        _node(14, "SaveImage", ["muted"], [_in("images", "IMAGE", 15)], mode=2),
        _node(15, "Note", ["just a note"]),
        _node(18, "VAEDecode", None, [_in("samples", "LATENT", 18), _in("vae", "VAE", 19)], ["IMAGE"], mode=2),
        _node(16, "FakeChooser", ["c", "randomize", "", 3, 0.5], [_in("image", "IMAGE", 16)]),
        _node(17, "FakeForced", [1, 999, 0.5], [_in("b", "INT", 17)]),
        _node(19, "FakeForced", [2, 0.25]),
        # Hand-written: no control value after the seed.
        _node(20, "KSampler", [7, 3, 1.0, "euler", "normal", 0.5]),
    ]
    links = [
        [1, 4, 0, 3, 0, "MODEL"],
        [3, 4, 1, 10, 0, "CLIP"],
        [4, 10, 0, 6, 0, "CLIP"],
        [5, 10, 0, 7, 0, "CLIP"],
        [6, 11, 0, 7, 1, "STRING"],
        [7, 5, 0, 13, 0, "LATENT"],
        [8, 13, 0, 3, 3, "LATENT"],
        [9, 12, 0, 3, 5, "INT"],
        [10, 6, 0, 3, 1, "CONDITIONING"],
        [11, 7, 0, 3, 2, "CONDITIONING"],
        [12, 3, 0, 8, 0, "LATENT"],
        [13, 4, 2, 8, 1, "VAE"],
        [14, 8, 0, 9, 0, "IMAGE"],
        [15, 8, 0, 14, 0, "IMAGE"],
        [16, 18, 0, 16, 0, "IMAGE"],
        [17, 12, 0, 17, 0, "INT"],
        [18, 3, 0, 18, 0, "LATENT"],
        [19, 4, 2, 18, 1, "VAE"],
    ]
    return {"last_node_id": 20, "last_link_id": 19, "nodes": nodes, "links": links, "version": 0.4}


EXPECTED_API = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
    "12": {"class_type": "PrimitiveInt", "inputs": {"value": 25}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 42, "steps": ["12", 0], "cfg": 7.5, "sampler_name": "dpmpp_2m", "scheduler": "karras",
        "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
    }},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "smoke"}},
    "16": {"class_type": "FakeChooser", "inputs": {"choice": "c", "count": 3, "scale": 0.5}},
    "17": {"class_type": "FakeForced", "inputs": {"a": 1, "c": 0.5, "b": ["12", 0]}},
    "19": {"class_type": "FakeForced", "inputs": {"a": 2, "c": 0.25}},
    "20": {"class_type": "KSampler", "inputs": {
        "seed": 7, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 0.5,
    }},
}


def test_ui_to_api_hand_written_graph() -> None:
    api = ui_to_api(_hand_written_ui_workflow(), FAKE_OBJECT_INFO)
    assert strip_meta(api) == EXPECTED_API
    assert api["4"]["_meta"] == {"title": "Load Checkpoint"}


def test_ui_to_api_accepts_link_objects() -> None:
    """Workflow schema 1 stores links as objects instead of lists."""
    workflow = _hand_written_ui_workflow()
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    workflow["links"] = [dict(zip(keys, link, strict=True)) for link in workflow["links"]]
    assert strip_meta(ui_to_api(workflow, FAKE_OBJECT_INFO)) == EXPECTED_API


def test_ui_to_api_rejects_unknown_node_types() -> None:
    workflow = _hand_written_ui_workflow()
    workflow["nodes"].append(_node(30, "NotInstalledNode", [1]))
    with pytest.raises(KeyError, match="NotInstalledNode"):
        ui_to_api(workflow, FAKE_OBJECT_INFO)


# --------------------------------------------------------------------------------------------
# A real server
# --------------------------------------------------------------------------------------------


def _smoke_api_graph(ckpt_name: str, seed: int = 1) -> dict[str, dict[str, Any]]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a person", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
        }},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "idfuse-e2e-smoke", "images": ["8", 0]}},
    }


def _smoke_ui_workflow(ckpt_name: str, seed: int = 1) -> dict[str, Any]:
    """The same graph as the frontend saves it."""
    nodes = [
        _node(4, "CheckpointLoaderSimple", [ckpt_name], outputs=["MODEL", "CLIP", "VAE"]),
        _node(6, "CLIPTextEncode", ["a photo of a person"],
              [_in("clip", "CLIP", 3), _in("text", "STRING", None, True)], ["CONDITIONING"]),
        _node(7, "CLIPTextEncode", ["blurry"], [_in("clip", "CLIP", 5), _in("text", "STRING", None, True)],
              ["CONDITIONING"]),
        _node(5, "EmptyLatentImage", [64, 64, 1], [_in("width", "INT", None, True)], ["LATENT"]),
        _node(3, "KSampler", [seed, "fixed", 2, 7.0, "euler", "normal", 1.0], [
            _in("model", "MODEL", 1), _in("positive", "CONDITIONING", 4), _in("negative", "CONDITIONING", 6),
            _in("latent_image", "LATENT", 2), _in("seed", "INT", None, True),
        ], ["LATENT"]),
        _node(8, "VAEDecode", None, [_in("samples", "LATENT", 7), _in("vae", "VAE", 8)], ["IMAGE"]),
        _node(9, "SaveImage", ["idfuse-e2e-smoke"], [_in("images", "IMAGE", 9)]),
        _node(10, "MarkdownNote", ["# smoke graph"]),
    ]
    links = [
        [1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"], [4, 6, 0, 3, 1, "CONDITIONING"],
        [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"], [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"],
        [9, 8, 0, 9, 0, "IMAGE"],
    ]
    return {"nodes": nodes, "links": links, "version": 0.4}


def test_server_answers_object_info(comfy_server: ComfyServer, object_info: dict[str, Any]) -> None:
    log.info("server started in %.1f s at %s", comfy_server.startup_seconds, comfy_server.url)
    for node in ("CheckpointLoaderSimple", "KSampler", "SaveImage"):
        assert node in object_info
    assert comfy_server.dirs.pack_link.resolve() == Path(__file__).resolve().parents[2]


def test_pack_is_loaded(comfy_server: ComfyServer, object_info: dict[str, Any]) -> None:
    failed = [item for item in import_failures(comfy_server.log_text()) if PACK_LINK_NAME in item]
    assert not failed, f"ComfyUI could not import the pack: {failed}\n{comfy_server.log_tail(80)}"
    assert comfy_server.pack_node_classes(object_info), (
        f"no node class registered by the pack; server log tail:\n{comfy_server.log_tail(80)}"
    )


def test_invalid_prompt_is_rejected_with_node_errors(comfy_client: ComfyClient) -> None:
    graph = _smoke_api_graph("does-not-exist.safetensors")
    with pytest.raises(PromptRejected, match=r"does-not-exist\.safetensors") as caught:
        comfy_client.queue_prompt(graph)
    assert "4" in caught.value.response["node_errors"]


def test_execution_error_names_node_and_traceback(comfy_client: ComfyClient) -> None:
    name = comfy_client.put_input("idfuse-e2e-broken.png", b"this is not a PNG file")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "idfuse-e2e-broken"}},
    }
    with pytest.raises(ExecutionFailed) as caught:
        comfy_client.run(graph, timeout=120)
    failure = caught.value
    assert failure.node_id == "1" and failure.node_type == "LoadImage"
    assert failure.exception_type and failure.exception_message
    assert "Traceback" in str(failure) or "File " in str(failure)


def test_sd15_checkpoint_graph_saves_an_image(comfy_client: ComfyClient, comfy_server: ComfyServer,
                                              sd15_checkpoint: Path) -> None:
    started = time.monotonic()
    outputs = comfy_client.run(_smoke_api_graph(sd15_checkpoint.name), timeout=600)
    log.info("SD1.5 smoke graph ran in %.1f s", time.monotonic() - started)
    images = comfy_client.output_files(outputs)
    assert len(images) == 1 and images[0].is_file(), outputs
    assert _png_size(images[0].read_bytes()) == (64, 64)
    assert comfy_client.view(outputs["9"]["images"][0]) == images[0].read_bytes()
    server_log = comfy_server.log_text()
    assert not key_warnings(server_log), key_warnings(server_log)
    # NaN pixels make numpy warn when SaveImage casts them to uint8.
    assert "invalid value encountered" not in server_log


def test_ui_workflow_converts_to_the_api_graph(comfy_client: ComfyClient, sd15_checkpoint: Path) -> None:
    info = comfy_client.object_info()  # fresh: the checkpoint list now has the random file
    api = ui_to_api(copy.deepcopy(_smoke_ui_workflow(sd15_checkpoint.name)), info)
    assert strip_meta(api) == _smoke_api_graph(sd15_checkpoint.name)
    assert api["4"]["_meta"]["title"] == info["CheckpointLoaderSimple"]["display_name"]


def test_random_checkpoint_loads_without_key_warnings(comfyui_path: Path, sd15_checkpoint: Path) -> None:
    """All key complaints, DEBUG-level ones included, when ComfyUI loads the random file."""
    from .harness.checkpoints import check_checkpoint_loads

    report = check_checkpoint_loads(sd15_checkpoint, comfyui_path)
    assert (report.model_config, report.clip, report.vae) == ("SD15", "SD1ClipModel", "AutoencoderKL")
    assert not report.key_warnings, report.key_warnings
