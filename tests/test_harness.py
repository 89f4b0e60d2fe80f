"""The test harness itself: in-process tests write only into temporary model folders."""

from __future__ import annotations

from pathlib import Path

import folder_paths

from comfyui_idfuse.nodes.glue.folders import FOLDERS


def test_model_folders_are_temporary(isolated_model_folders):
    assert Path(folder_paths.models_dir) == isolated_model_folders
    for name in [*FOLDERS, "loras", "checkpoints"]:
        for path in folder_paths.get_folder_paths(name):
            assert Path(path).is_relative_to(isolated_model_folders), (name, path)
