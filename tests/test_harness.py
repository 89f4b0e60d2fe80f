"""The test harness itself: in-process tests write only into temporary model folders, and the one
ComfyUI locator (comfy_env) finds what the unit tests and the e2e harness run on."""

from __future__ import annotations

from pathlib import Path

import comfy_env
import folder_paths
import pytest
from e2e.harness.locate import full_comfyui

from comfyui_idfuse.nodes.glue.folders import FOLDERS


def test_model_folders_are_temporary(isolated_model_folders):
    assert Path(folder_paths.models_dir) == isolated_model_folders
    for name in [*FOLDERS, "loras", "checkpoints"]:
        for path in folder_paths.get_folder_paths(name):
            assert Path(path).is_relative_to(isolated_model_folders), (name, path)


def _fake_comfyui(root: Path, full: bool) -> Path:
    (root / "comfy").mkdir(parents=True)
    (root / "comfy" / "model_patcher.py").write_text("")
    if full:
        for name in comfy_env.FULL_COMFYUI_FILES:
            (root / name).write_text("")
    return root


def test_locator_takes_comfyui_path_first(tmp_path):
    full = _fake_comfyui(tmp_path / "full", full=True)
    core = _fake_comfyui(tmp_path / "core", full=False)
    pack = _fake_comfyui(tmp_path / "ComfyUI", full=True) / "custom_nodes" / "pack"
    pack.mkdir(parents=True)

    found = comfy_env.locate_comfy({"COMFYUI_PATH": str(full)}, pack_dir=pack)
    assert (found.root, found.kind) == (full, "full")
    assert full_comfyui(found).path == full

    found = comfy_env.locate_comfy({"COMFYUI_PATH": str(core)}, pack_dir=pack)
    assert (found.root, found.kind) == (core, "core")
    location = full_comfyui(found)
    assert location.path is None and f"COMFYUI_PATH={core} is not a full ComfyUI" in location.reason

    with pytest.raises(RuntimeError, match="does not contain comfy/model_patcher.py"):
        comfy_env.locate_comfy({"COMFYUI_PATH": str(tmp_path / "nothing")}, pack_dir=pack)


def test_locator_finds_the_comfyui_holding_the_pack(tmp_path):
    comfy = _fake_comfyui(tmp_path / "ComfyUI", full=True)
    in_place = comfy / "custom_nodes" / "pack"
    in_place.mkdir(parents=True)
    found = comfy_env.locate_comfy({}, pack_dir=in_place)
    assert (found.root, found.kind) == (comfy, "full")
    assert full_comfyui(found).path == comfy

    # A pack checked out elsewhere and symlinked into custom_nodes/ is found where it is reached.
    elsewhere = tmp_path / "checkout"
    elsewhere.mkdir()
    (comfy / "custom_nodes" / "linked").symlink_to(elsewhere, target_is_directory=True)
    found = comfy_env.locate_comfy({}, pack_dir=comfy / "custom_nodes" / "linked")
    assert found is not None and found.root == comfy

    assert comfy_env.locate_comfy({}, pack_dir=elsewhere) is None


def test_without_a_full_comfyui_the_e2e_harness_says_how_to_get_one(comfy_install):
    pinned = comfy_env.ComfyInstall(comfy_install.root, "core")
    assert pinned.is_pinned_core
    location = full_comfyui(pinned)
    assert location.path is None and "set COMFYUI_PATH" in location.reason
    assert full_comfyui(comfy_install).path == (comfy_install.root if comfy_install.is_full else None)
