"""End to end: the trainer example workflow in a real ComfyUI server, then its files in core's LoraLoader."""

from __future__ import annotations

import json

import numpy as np
from comfy_env import PACK_ROOT
from PIL import Image

from .harness.workflow import load_workflow, override_inputs, trained_files_graph, ui_to_api

WORKFLOW = PACK_ROOT / "example_workflows" / "idfuse_train_identity.json"


def test_e2e_trainer_workflow_then_lora_loader(comfy_client, comfy_server, comfy_dirs, sd15_checkpoint, face_models):
    info = comfy_client.object_info()
    api = ui_to_api(load_workflow(WORKFLOW), info)
    # The example holds both trainer nodes at their defaults (its widget values sit on the right widgets),
    # the options node linked to the trainer's options input.
    (trainer,) = [n for n in api.values() if n["class_type"] == "IDFuseTrainIdentity"]
    (options_id,) = [i for i, n in api.items() if n["class_type"] == "IDFuseTrainingOptions"]
    assert trainer["inputs"]["options"] == [options_id, 0]
    # ... except the sample prompts, which the example sets to show what the samples output is for.
    for node in (trainer, api[options_id]):
        widgets = {name: spec[1]["default"] for name, spec in info[node["class_type"]]["input"]["required"].items()
                   if len(spec) > 1 and "default" in spec[1] and name != "sample_prompts"}
        assert {name: node["inputs"][name] for name in widgets} == widgets, node["class_type"]
    prompts = api[options_id]["inputs"]["sample_prompts"].splitlines()
    assert len(prompts) == 2 and all("sks" in prompt for prompt in prompts)
    override_inputs(api, "CheckpointLoaderSimple", ckpt_name=sd15_checkpoint.name)
    override_inputs(api, "IDFuseTrainIdentity", steps=2, lora_rank=4, save_name="e2e_identity")
    # 2 steps with sample_every 100: one sample round, after the last step, of the example's two prompts.
    override_inputs(api, "IDFuseTrainingOptions", resolution=64, checkpoint_every=0, sample_size=256, sample_steps=2)
    override_inputs(api, "EmptyLatentImage", width=64, height=64)
    override_inputs(api, "KSampler", steps=2)
    outputs = comfy_client.run(api, timeout=1200)
    images = [item for node in outputs.values() for item in node.get("images", [])]
    assert len(images) >= 4  # loss curve, attention maps, samples, generated image

    tokens = comfy_dirs.model_folder("idfuse/tokens") / "e2e_identity.safetensors"
    lora = comfy_dirs.model_folder("loras") / "e2e_identity.safetensors"
    report = json.loads((comfy_dirs.model_folder("idfuse/tokens") / "e2e_identity.report.json").read_text())
    assert tokens.exists() and lora.exists()
    assert report["steps_done"] == 2
    assert report["settings"]["resolution"] == 64 and report["settings"]["lora_rank"] == 4  # both nodes' values
    assert report["timing"]["sample_rounds"] == 1 and report["timing"]["sampling_seconds"] > 0
    (round_file,) = (comfy_dirs.model_folder("idfuse/tokens") / "e2e_identity.samples").glob("step_*.png")
    assert round_file.name == "step_000002.png"
    assert np.asarray(Image.open(round_file)).shape[0] >= 256  # the two prompts' 256² images, labelled

    # The saved files, used the ordinary way: core's LoraLoader and the token nodes.
    info = comfy_client.object_info()  # again: the new files are listed now
    assert "e2e_identity.safetensors" in info["LoraLoader"]["input"]["required"]["lora_name"][0]
    graph = trained_files_graph(sd15_checkpoint.name, lora.name, tokens.name, 64, "e2e_trained")
    (path,) = comfy_client.output_files(comfy_client.run(graph, timeout=600))
    assert np.asarray(Image.open(path)).shape == (64, 64, 3)
    assert "lora key not loaded" not in comfy_server.log_text()
