"""Model folders of the pack, registered with ComfyUI's folder_paths (extra_model_paths.yaml works too)."""

from __future__ import annotations

import os

import folder_paths

ID_TOKENS_FOLDER = "idfuse_tokens"

_FOLDERS = {
    ID_TOKENS_FOLDER: (os.path.join("idfuse", "tokens"), {".safetensors"}),
}


def register_model_folders() -> None:
    for name, (relative, extensions) in _FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, relative)
        # extra_model_paths.yaml may already have created the entry (with no extensions).
        folder_paths.add_model_folder_path(name, default, is_default=True)
        paths, known = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(known) | extensions)


def default_folder(name: str) -> str:
    return os.path.join(folder_paths.models_dir, _FOLDERS[name][0])
