"""The trainer nodes' inputs for tests: their defaults, shrunk to a few steps on small photos."""

from __future__ import annotations

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
