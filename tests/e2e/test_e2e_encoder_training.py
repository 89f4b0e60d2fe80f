"""End to end: photos -> scripts/prepare_faces.py -> scripts/train_id_encoder.py (subprocesses, as a user runs
them) -> the exported IDFuse encoder in the server's ID-encoder folder -> the Infinite-ID example workflow with
it, in a real ComfyUI server: images come out.

The photos are package photos (scikit-image's astronaut and cameraman), several augmented views of each standing
in for different photos of one person; faces by the dlib backend (the scripts' default, so the workflow's face
analysis is switched to dlib: the encoder reads dlib embeddings); CLIP features by a random-weight ViT-H/14 file
(what an IDFuse encoder's CLIP mapper reads) written into the server's clip_vision folder; the frozen UNet is the
harness's random-weight SD1.5 checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from comfy_env import PACK_ROOT
from PIL import Image, ImageEnhance

from .harness.checkpoints import TensorSpec, read_metadata, write_random_safetensors
from .harness.workflow import load_workflow, override_inputs, ui_to_api

CLIP_VISION_NAME = "idfuse-e2e-random-vit-h.safetensors"
ENCODER_NAME = "idfuse-e2e-trained.safetensors"
DLIB_HOG = "dlib HOG (public domain, built in)"  # models/faces/dlib.py HOG_MODEL
RESOLUTION = 64  # training crops: 8x8 latents keep the real-size UNet's steps short on a CPU
STEPS = 2
SCRIPT_TIMEOUT = 1800

# Runs inside ``python -c`` with argv [comfy_root]: the key table of ComfyUI's ViT-H/14 CLIP vision model.
_VIT_H_TABLE_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.clip_model, comfy.clip_vision, comfy.ops
config_file = os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_h.json")
with open(config_file) as f:
    config = json.load(f)
with torch.device("meta"):
    model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, torch.device("meta"), comfy.ops.manual_cast)
print(json.dumps([[k, list(t.shape)] for k, t in model.state_dict().items()]))
"""


def _fill(key: str) -> str:
    if key.endswith(".bias"):
        return "zeros"
    norm = any(part in key for part in ("layer_norm", "layrnorm", "layernorm"))
    return "ones" if norm and key.endswith(".weight") else "normal"


def write_random_clip_vision(path: Path, comfy_root: Path) -> Path:
    """A random-weight CLIP vision file that ComfyUI's CLIPVisionLoader loads as ViT-H/14 (1.26 GB in fp16)."""
    metadata = {"format": "pt", "idfuse_e2e": "random-vit-h"}
    if path.is_file() and read_metadata(path) == metadata:
        return path
    result = subprocess.run([sys.executable, "-c", _VIT_H_TABLE_SCRIPT, str(comfy_root)], cwd=comfy_root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    table = json.loads(result.stdout.strip().splitlines()[-1])
    specs = sorted((TensorSpec(key, tuple(shape), _fill(key)) for key, shape in table), key=lambda s: s.key)
    return write_random_safetensors(path, specs, metadata=metadata)


def augmented_views(photo: np.ndarray, count: int) -> list[Image.Image]:
    """``count`` different photos of one face: mirrored, cropped around it, brightness / colour changed; twice the
    package photo's size, so the face is well above prepare_faces.py's minimum face size."""
    image = Image.fromarray(photo).convert("RGB")
    image = image.resize((2 * image.width, 2 * image.height), Image.Resampling.LANCZOS)
    width, height = image.size
    views = [image]
    for index in range(1, count):
        view = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if index % 2 else image
        margin = 0.04 * index
        view = view.crop((int(width * margin), int(height * margin / 2), int(width * (1 - margin / 2)), height))
        view = ImageEnhance.Brightness(view).enhance(1.0 + 0.08 * (index - 2))
        view = ImageEnhance.Color(view).enhance(0.8 + 0.1 * index)
        views.append(view)
    return views


def package_people() -> dict[str, np.ndarray]:
    from skimage import data

    return {"astronaut": data.astronaut(), "cameraman": np.stack([data.camera()] * 3, axis=-1)}


def write_photo_folders(root: Path) -> Path:
    """``root/<identity>/*.jpg``, the folder-per-identity layout, from package photos."""
    for name, photo in package_people().items():
        folder = root / name
        folder.mkdir(parents=True)
        for index, view in enumerate(augmented_views(photo, 4)):
            view.save(folder / f"{index}.jpg", quality=95)
    return root


def run_script(script: str, args: list[str], comfyui_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, str(PACK_ROOT / "scripts" / script), *args, "--comfyui",
                             str(comfyui_path), "--cpu"], env=env, capture_output=True, text=True,
                            timeout=SCRIPT_TIMEOUT)
    assert result.returncode == 0, f"{script} failed (exit {result.returncode}):\n{result.stderr[-6000:]}"
    return result


@pytest.fixture()
def clip_vision(comfyui_path, comfy_dirs) -> Path:
    return write_random_clip_vision(comfy_dirs.model_folder("clip_vision") / CLIP_VISION_NAME, comfyui_path)


def test_e2e_encoder_training_prepare_train_and_sample(comfy_client, comfyui_path, comfy_dirs, sd15_checkpoint,
                                                       clip_vision, tmp_path):
    photos = write_photo_folders(tmp_path / "photos")
    data, run = tmp_path / "faces", tmp_path / "run"
    run_script("prepare_faces.py", [str(photos), "--out", str(data), "--resolution", str(RESOLUTION),
                                    "--clip-vision", str(clip_vision)], comfyui_path)
    index = json.loads((data / "index.json").read_text())
    assert {item["name"] for item in index["identities"]} == {"astronaut", "cameraman"}
    assert index["embedding_space"] == "dlib-resnet-128"

    run_script("train_id_encoder.py", ["--checkpoint", str(sd15_checkpoint), "--data", str(data), "--output", str(run),
                                       "--steps", str(STEPS), "--batch-size", "1", "--save-every", str(STEPS),
                                       "--validation-identities", "1", "--validate-every", str(STEPS),
                                       "--validation-size", "64", "--validation-sampling-steps", "1", "--log-every", "1"],
               comfyui_path)
    # The held-out identity's validation grid went to TensorBoard, scored with the dataset's dlib backend.
    events = list(run.rglob("events.out.tfevents*"))
    assert events, f"no TensorBoard event file under {run}"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    assert "validation" in accumulator.Tags()["images"], accumulator.Tags()
    assert "validation/identity_score" in accumulator.Tags()["scalars"], accumulator.Tags()
    exported = run / "idfuse_encoder.safetensors"
    metadata = read_metadata(exported)
    assert metadata["format"] == "idfuse.id_encoder" and metadata["model_family"] == "sd15"
    assert metadata["embedding_space"] == "dlib-resnet-128"
    assert json.loads(metadata["training"])["steps"] == STEPS
    shutil.copy(exported, comfy_dirs.model_folder(os.path.join("idfuse", "encoders")) / ENCODER_NAME)

    augmented_views(package_people()["astronaut"], 2)[1].resize((512, 512)).save(comfy_dirs.input / "face.png")
    api = ui_to_api(load_workflow(PACK_ROOT / "example_workflows" / "idfuse_infinite_id.json"),
                    comfy_client.object_info())
    override_inputs(api, "CheckpointLoaderSimple", ckpt_name=sd15_checkpoint.name)
    override_inputs(api, "EmptyLatentImage", width=64, height=64)
    override_inputs(api, "IDFuseInfiniteIDSampler", steps=2)
    override_inputs(api, "IDFuseLoadIDEncoder", encoder_name=ENCODER_NAME)
    override_inputs(api, "IDFuseLoadFaceAnalysis", model_name=DLIB_HOG, provider="CPU")
    override_inputs(api, "LoadImage", image="face.png")
    api["clip_vision_loader"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION_NAME}}
    override_inputs(api, "IDFuseFaceEmbed", clip_vision=["clip_vision_loader", 0])
    # The real-size models on a CPU: a busy machine can keep the server from answering a poll within the client's
    # default minute while it samples.
    saved_timeout, comfy_client.request_timeout = comfy_client.request_timeout, 600.0
    try:
        outputs = comfy_client.run(api, timeout=1800)
    finally:
        comfy_client.request_timeout = saved_timeout

    saves = [i for i, n in api.items() if n["class_type"] == "SaveImage"]
    assert saves
    for save in saves:
        images = [np.asarray(Image.open(comfy_client.output_path(item))) for item in outputs[save]["images"]]
        assert images and images[0].shape == (64, 64, 3)
        assert images[0].std() > 0  # an image, not a blank
