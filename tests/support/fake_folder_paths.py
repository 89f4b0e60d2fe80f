"""Stand-in for ComfyUI's ``folder_paths`` where only the core (notcomfy) is installed.

Implements the few functions the pack calls, with the same signatures and semantics.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

base_path = tempfile.mkdtemp(prefix="idfuse-comfy-")
# A test run leaves nothing behind in the temp folder (CI machines have finite disks).
atexit.register(shutil.rmtree, base_path, ignore_errors=True)
models_dir = os.path.join(base_path, "models")
supported_pt_extensions = {".ckpt", ".pt", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {
    "loras": ([os.path.join(models_dir, "loras")], supported_pt_extensions),
    "checkpoints": ([os.path.join(models_dir, "checkpoints")], supported_pt_extensions),
}


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    paths, exts = folder_names_and_paths.setdefault(folder_name, ([], set()))
    if full_folder_path in paths:
        paths.remove(full_folder_path)
    if is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name: str) -> list[str]:
    paths, exts = folder_names_and_paths[folder_name]
    found = set()
    for base in paths:
        if not os.path.isdir(base):
            continue
        for dirpath, _dirs, files in os.walk(base, followlinks=True):
            for name in files:
                if not exts or os.path.splitext(name)[1].lower() in exts:
                    found.add(os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/"))
    return sorted(found)


def get_full_path(folder_name: str, filename: str) -> str | None:
    for base in folder_names_and_paths[folder_name][0]:
        path = os.path.join(base, os.path.normpath(filename))
        if os.path.isfile(path):
            return path
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    path = get_full_path(folder_name, filename)
    if path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return path
