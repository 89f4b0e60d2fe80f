"""The ID_ENCODER socket's value, where ID-encoder files are found (IDFuse's folder and IP-Adapter's), and
loading the encoder for a run."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from itertools import chain

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch

from ...models.encoders import IDEncoder
from .folders import ID_ENCODERS_FOLDER, IPADAPTER_FOLDER

log = logging.getLogger("idfuse.nodes")

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


def load_fully(loaded: LoadedIDEncoder) -> torch.device:
    """Load the encoder through ComfyUI's model management, all of it, and return the device its weights are on.

    A plain load may be partial when VRAM is short, and a partial load leaves the modules that did not fit on
    the offload device: the encoder's modules are plain torch (no cast-on-the-fly weights), so encoding would
    then mix devices. The encoder is small and runs once per sampling, so it is loaded whole
    (``force_full_load``, in ComfyUI since late 2024); where that is missing or not honoured (--novram loads
    partially whatever is asked), whatever was left behind is moved to the load device here.
    """
    load = comfy.model_management.load_models_gpu
    if "force_full_load" in inspect.signature(load).parameters:
        load([loaded.patcher], force_full_load=True)
    else:
        load([loaded.patcher])
    device = torch.device(loaded.patcher.load_device)
    tensors = list(chain(loaded.encoder.parameters(), loaded.encoder.buffers()))
    stray = [t for t in tensors if t.device != device]
    if stray and len(stray) < len(tensors):
        log.info("ID encoder %s was loaded partially (%d of %d tensors on %s); moving the rest there",
                 loaded.source, len(tensors) - len(stray), len(tensors), device)
        loaded.encoder.to(device)
    elif stray:  # nothing was loaded (--novram): it runs where it is, on one device
        device = stray[0].device
    return device
