"""End to end: IDFuse Load Training Photos reads a folder below ComfyUI's input folder (photos of two aspects, a
caption, a file that is not a photo) and IDFuse Train Identity trains from it, in a real ComfyUI server."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from skimage import data

SAVE_NAME = "e2e_folder_identity"


def _defaults(info: dict, node_class: str) -> dict:
    return {name: spec[1]["default"] for name, spec in info[node_class]["input"]["required"].items()
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}


def test_e2e_trainer_trains_from_a_photo_folder_with_a_caption(comfy_client, comfy_dirs, sd15_checkpoint):
    folder = comfy_dirs.input / "e2e_person"
    folder.mkdir(exist_ok=True)
    astronaut = data.astronaut()
    Image.fromarray(astronaut).save(folder / "01_square.png")
    wide = np.zeros((512, 768, 3), np.uint8)  # the same face on a wider photo: cropped around it, not squashed
    wide[:, 128:640] = astronaut
    Image.fromarray(wide).save(folder / "02_wide.jpg")
    (folder / "02_wide.txt").write_text("{} in a spacesuit, smiling")
    (folder / "notes.md").write_text("not a photo")

    info = comfy_client.object_info()
    options = {**_defaults(info, "IDFuseTrainingOptions"), "resolution": 64, "checkpoint_every": 0}
    trainer = {**_defaults(info, "IDFuseTrainIdentity"), "steps": 1, "save_name": SAVE_NAME}
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint.name}},
        "photos": {"class_type": "IDFuseLoadTrainingPhotos", "inputs": {"folder": "e2e_person", "max_photos": 0,
                                                                        "caption_extension": ".txt",
                                                                        "on_no_face": "error"}},
        "options": {"class_type": "IDFuseTrainingOptions", "inputs": options},
        "train": {"class_type": "IDFuseTrainIdentity", "inputs": {
            **trainer, "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2],
            "training_photos": ["photos", 0], "options": ["options", 0]}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["photos", 1]}},
        "maps": {"class_type": "PreviewImage", "inputs": {"images": ["train", 4]}},
    }
    outputs = comfy_client.run(graph, timeout=1200)

    assert comfy_client.output_files({"preview": outputs["preview"]})  # the photos with their names and captions
    # Two photos trained (the .md file skipped), each cropped square at the training size: photo | before | after.
    panels = comfy_client.output_files({"maps": outputs["maps"]})
    assert [np.asarray(Image.open(path)).shape for path in panels] == [(64, 3 * 64, 3)] * 2
    report = json.loads((comfy_dirs.model_folder("idfuse/tokens") / f"{SAVE_NAME}.report.json").read_text())
    assert report["steps_done"] == 1 and report["settings"]["resolution"] == 64
    assert len(report["face_attention_share"]["per_photo"]["after"]) == 2
