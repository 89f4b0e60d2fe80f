"""End to end: the SDXL trainer example workflow (2 steps at 256 x 256) in a real ComfyUI server on the random
SDXL checkpoint, then its token file and LoRA the ordinary way (core's LoraLoader and the token nodes)."""

from __future__ import annotations

import json

import numpy as np
from comfy_env import PACK_ROOT
from PIL import Image

from .harness.workflow import load_workflow, override_inputs, trained_files_graph, ui_to_api

WORKFLOW = PACK_ROOT / "example_workflows" / "idfuse_sdxl_train_identity.json"
SIZE = 256
SAVE_NAME = "e2e_identity_sdxl"


def _options_widgets(workflow) -> list:
    (options,) = [n for n in workflow["nodes"] if n["type"] == "IDFuseTrainingOptions"]
    return options["widgets_values"]


def test_e2e_sdxl_trainer_workflow_then_lora_loader(sdxl_checkpoint, comfy_client, comfy_server, comfy_dirs,
                                                     face_models):
    info = comfy_client.object_info()
    workflow = load_workflow(WORKFLOW)
    api = ui_to_api(workflow, info)
    (options_id,) = [i for i, n in api.items() if n["class_type"] == "IDFuseTrainingOptions"]
    (trainer_id,) = [i for i, n in api.items() if n["class_type"] == "IDFuseTrainIdentity"]
    assert api[trainer_id]["inputs"]["options"] == [options_id, 0]
    # The example trains at SDXL's size and shows sample prompts with the placeholder every 100 steps.
    example = api[options_id]["inputs"]
    assert example["resolution"] == 1024 and example["sample_size"] == 1024 and example["sample_every"] == 100
    prompts = [line for line in example["sample_prompts"].splitlines() if line.strip()]
    assert len(prompts) >= 2 and all("sks" in line for line in prompts)
    assert len(_options_widgets(workflow)) == sum(
        1 for spec in info["IDFuseTrainingOptions"]["input"]["required"].values())  # every widget has its value

    override_inputs(api, "CheckpointLoaderSimple", ckpt_name=sdxl_checkpoint.name)
    override_inputs(api, "IDFuseTrainIdentity", steps=2, lora_rank=4, save_name=SAVE_NAME)
    override_inputs(api, "IDFuseTrainingOptions", resolution=SIZE, checkpoint_every=0, sample_prompts="",
                    sample_size=SIZE, validation_loss=False)
    override_inputs(api, "EmptyLatentImage", width=SIZE, height=SIZE)
    override_inputs(api, "KSampler", steps=2)
    outputs = comfy_client.run(api, timeout=3600)
    images = [item for node in outputs.values() for item in node.get("images", [])]
    assert len(images) >= 3  # loss curve, attention maps, generated image
    (generated,) = comfy_client.output_files({i: outputs[i] for i, n in api.items() if n["class_type"] == "SaveImage"})
    assert np.asarray(Image.open(generated)).shape == (SIZE, SIZE, 3)

    tokens_dir = comfy_dirs.model_folder("idfuse/tokens")
    tokens = tokens_dir / f"{SAVE_NAME}.safetensors"
    lora = comfy_dirs.model_folder("loras") / f"{SAVE_NAME}.safetensors"
    report = json.loads((tokens_dir / f"{SAVE_NAME}.report.json").read_text())
    assert tokens.exists() and lora.exists()
    assert report["model_family"] == "sdxl" and report["steps_done"] == 2
    assert report["settings"]["resolution"] == SIZE and report["settings"]["lora_rank"] == 4

    # The saved files, used the ordinary way: every LoRA key must land on SDXL's layers.
    info = comfy_client.object_info()  # again: the new files are listed now
    assert lora.name in info["LoraLoader"]["input"]["required"]["lora_name"][0]
    graph = trained_files_graph(sdxl_checkpoint.name, lora.name, tokens.name, SIZE, "e2e_sdxl_trained")
    (path,) = comfy_client.output_files(comfy_client.run(graph, timeout=1800))
    assert np.asarray(Image.open(path)).shape == (SIZE, SIZE, 3)
    assert "lora key not loaded" not in comfy_server.log_text()
