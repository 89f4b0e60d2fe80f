"""The trainer nodes' inputs for tests: their defaults, shrunk to a few steps on small photos; the
photos; and the node run as ComfyUI runs it."""

from __future__ import annotations

import torch

from comfyui_idfuse.nodes.train import IDFuseTrainIdentity, IDFuseTrainingOptions

SIZE = 128  # photos -> 16x16 latents: layers of 8x8 (downscale 2) and 4x4 (downscale 4)
SMALL_RUN = {"num_stages": 2, "steps": 2, "learning_rate": 0.01, "attention_weight": 300.0, "lora_rank": 4,
             "templates": "a photo of the face of {}", "augmentation": "none", "resolution": SIZE,
             "checkpoint_every": 0, "resume_from": "none"}


def widget_defaults(node) -> dict:
    """The default of every widget of a node, as INPUT_TYPES declares it."""
    return {name: spec[1]["default"] for name, spec in node.INPUT_TYPES()["required"].items()
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}


def settings(**changes) -> dict:
    """Keyword arguments of IDFuseTrainIdentity.train: its own widgets, and ``options`` from an IDFuse
    Training Options node; each change goes to the node that has the input."""
    identity, options = widget_defaults(IDFuseTrainIdentity), widget_defaults(IDFuseTrainingOptions)
    for name, value in {**SMALL_RUN, **changes}.items():
        if name in identity:
            identity[name] = value
        elif name in options:
            options[name] = value
        else:
            raise KeyError(f"neither trainer node has an input {name!r}")
    return {**identity, "options": IDFuseTrainingOptions().options(**options)[0]}


def face_photos(count: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Bluish background, a skin-coloured 'face' block; and its mask."""
    gen = torch.Generator().manual_seed(0)
    images = 0.1 * torch.rand(count, SIZE, SIZE, 3, generator=gen) + torch.tensor([0.1, 0.2, 0.6])
    images[:, 32:96, 40:88] = 0.1 * torch.rand(count, 64, 48, 3, generator=gen) + torch.tensor([0.9, 0.7, 0.5])
    masks = torch.zeros(count, SIZE, SIZE)
    masks[:, 32:96, 40:88] = 1.0
    return images, masks


def train_node(model, clip, vae, images, masks, save_name: str, **changes):
    """IDFuse Train Identity on these inputs with ``settings(**changes)``, inside torch.inference_mode
    as ComfyUI runs nodes."""
    with torch.inference_mode():
        return IDFuseTrainIdentity().train(model, clip, vae, images, masks=masks, **settings(save_name=save_name,
                                                                                           **changes))
