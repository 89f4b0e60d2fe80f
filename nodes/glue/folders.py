"""Model folders of the pack, registered with ComfyUI's folder_paths (extra_model_paths.yaml works too)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths

ID_TOKENS_FOLDER = "idfuse_tokens"
ID_ENCODERS_FOLDER = "idfuse_encoders"
IPADAPTER_FOLDER = "ipadapter"  # where ComfyUI_IPAdapter_plus users keep their FaceID files
INSIGHTFACE_FOLDER = "insightface"  # insightface's root: <root>/models/<pack>/*.onnx


@dataclass(frozen=True)
class ModelFolder:
    relative: str  # below ComfyUI/models
    extensions: frozenset[str]
    shared: bool = False  # also registered by other packs: keep their settings and order


FOLDERS: dict[str, ModelFolder] = {
    ID_TOKENS_FOLDER: ModelFolder(os.path.join("idfuse", "tokens"), frozenset({".safetensors"})),
    ID_ENCODERS_FOLDER: ModelFolder(os.path.join("idfuse", "encoders"), frozenset({".safetensors", ".bin"})),
    IPADAPTER_FOLDER: ModelFolder("ipadapter", frozenset({".safetensors", ".bin"}), shared=True),
    INSIGHTFACE_FOLDER: ModelFolder("insightface", frozenset(), shared=True),
}


def register_model_folders() -> None:
    for name, folder in FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, folder.relative)
        existed = name in folder_paths.folder_names_and_paths
        if default not in folder_paths.folder_names_and_paths.get(name, ([], set()))[0]:
            folder_paths.add_model_folder_path(name, default, is_default=not folder.shared)
        paths, known = folder_paths.folder_names_and_paths[name]
        # An entry made by extra_model_paths.yaml has no extensions yet; a shared entry without
        # extensions lists every file on purpose.
        if not (folder.shared and existed and not known):
            folder_paths.folder_names_and_paths[name] = (paths, set(known) | folder.extensions)


def default_folder(name: str) -> str:
    return os.path.join(folder_paths.models_dir, FOLDERS[name].relative)
