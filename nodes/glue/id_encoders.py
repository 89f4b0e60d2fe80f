"""The ID_ENCODER socket's value and where ID-encoder files are found (IDFuse's folder and IP-Adapter's)."""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_patcher
import folder_paths

from ...models.encoders import IDEncoder
from .folders import ID_ENCODERS_FOLDER, IPADAPTER_FOLDER

IPADAPTER_PREFIX = "ipadapter/"


@dataclass(frozen=True)
class LoadedIDEncoder:
    """The ID_ENCODER value: the encoder and the ModelPatcher through which ComfyUI loads and offloads it."""

    patcher: comfy.model_patcher.ModelPatcher
    encoder: IDEncoder
    source: str


def encoder_choices() -> list[str]:
    own = folder_paths.get_filename_list(ID_ENCODERS_FOLDER)
    return own + [IPADAPTER_PREFIX + name for name in folder_paths.get_filename_list(IPADAPTER_FOLDER)]


def encoder_path(name: str) -> str | None:
    if name.startswith(IPADAPTER_PREFIX):
        path = folder_paths.get_full_path(IPADAPTER_FOLDER, name[len(IPADAPTER_PREFIX):])
        if path is not None:
            return path
    return folder_paths.get_full_path(ID_ENCODERS_FOLDER, name)
