from __future__ import annotations

import os
import sys

# Helpers and fixtures live in tests/support/ and are imported by their module names. The path is
# not resolved, so that comfy_env sees a pack symlinked into ComfyUI/custom_nodes/ where it is reached.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))

import comfy_env  # noqa: E402
import pytest  # noqa: E402

COMFY = comfy_env.setup_comfy()


def pytest_report_header(config):
    return f"ComfyUI: {COMFY.kind} at {COMFY.root} ({COMFY.found_by})"


@pytest.fixture(scope="session")
def comfy_install():
    return COMFY


@pytest.fixture(scope="session")
def tokenizer_dir():
    return comfy_env.clip_tokenizer_dir(COMFY)


@pytest.fixture(scope="session")
def pack():
    return comfy_env.import_pack()


@pytest.fixture(scope="session", autouse=True)
def isolated_model_folders(tmp_path_factory):
    """In-process tests never write into a real ComfyUI's models folder (with COMFYUI_PATH set, the
    real folder_paths points there): every model folder under its models_dir is redirected into a
    temporary one for the session, and restored afterwards."""
    import folder_paths

    root = tmp_path_factory.mktemp("comfy-models")
    saved_dir = folder_paths.models_dir
    saved = {name: (list(paths), exts) for name, (paths, exts) in folder_paths.folder_names_and_paths.items()}

    def moved(path: str) -> str:
        relative = os.path.relpath(path, saved_dir)
        return path if relative.startswith("..") else str(root / relative)

    folder_paths.models_dir = str(root)
    for name, (paths, exts) in saved.items():
        folder_paths.folder_names_and_paths[name] = ([moved(p) for p in paths], exts)
    yield root
    folder_paths.models_dir = saved_dir
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test of tiny models: one runs them as fast, and on a busy machine several threads
    fight over the cores (measured: 0.4 s against 18 s a training step on 2 shared cores). Restored afterwards.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
