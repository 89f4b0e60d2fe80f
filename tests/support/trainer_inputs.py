"""The trainer node's inputs for tests: its defaults, shrunk to a few steps on small photos."""

from __future__ import annotations

from comfyui_idfuse.nodes.train import IDFuseTrainIdentity

SIZE = 128  # photos -> 16x16 latents: layers of 8x8 (downscale 2) and 4x4 (downscale 4)


def settings(**changes) -> dict:
    values = {name: spec[1].get("default") for name, spec in IDFuseTrainIdentity.INPUT_TYPES()["required"].items()
              if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}
    values.update(num_stages=2, steps=2, learning_rate=0.01, attention_weight=300.0, lora_rank=4,
                  templates="a photo of the face of {}", augmentation="none", resolution=SIZE, checkpoint_every=0,
                  resume_from="none")
    values.update(changes)
    return values
