"""The isolated ``--base-directory`` of one server: everything ComfyUI writes lands under it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from comfy_env import PACK_ROOT

PACK_LINK_NAME = "comfyui-idfuse"


@dataclass(frozen=True)
class ServerDirs:
    """The folders of one isolated server (everything ComfyUI writes lands under ``base``)."""

    base: Path

    @property
    def custom_nodes(self) -> Path:
        return self.base / "custom_nodes"

    @property
    def pack_link(self) -> Path:
        return self.custom_nodes / PACK_LINK_NAME

    @property
    def models(self) -> Path:
        return self.base / "models"

    @property
    def checkpoints(self) -> Path:
        return self.models / "checkpoints"

    @property
    def input(self) -> Path:
        return self.base / "input"

    @property
    def output(self) -> Path:
        return self.base / "output"

    @property
    def temp(self) -> Path:
        return self.base / "temp"

    @property
    def user(self) -> Path:
        return self.base / "user"

    @property
    def log_file(self) -> Path:
        return self.base / "server.log"

    def model_folder(self, kind: str) -> Path:
        """``models/<kind>`` (``checkpoints``, ``loras``, ``clip_vision``, ...), created on demand."""
        folder = self.models / kind
        folder.mkdir(parents=True, exist_ok=True)
        return folder


_MODEL_FOLDERS = ("checkpoints", "loras", "vae", "clip", "text_encoders", "clip_vision", "controlnet",
                  "diffusion_models", "embeddings", "upscale_models", "configs")


def prepare_base_dir(base: Path, pack_root: Path = PACK_ROOT) -> ServerDirs:
    """Create the folder layout and symlink the pack as ``custom_nodes/comfyui-idfuse``."""
    dirs = ServerDirs(base)
    for folder in (dirs.custom_nodes, dirs.input, dirs.output, dirs.temp, dirs.user):
        folder.mkdir(parents=True, exist_ok=True)
    for kind in _MODEL_FOLDERS:
        (dirs.models / kind).mkdir(parents=True, exist_ok=True)
    if not dirs.pack_link.is_symlink():
        dirs.pack_link.symlink_to(pack_root.resolve(), target_is_directory=True)
    return dirs
