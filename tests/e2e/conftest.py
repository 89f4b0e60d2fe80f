"""Fixtures running the pack inside a real ComfyUI server (session scope).

Every test under tests/e2e gets the ``e2e`` marker. Tests that use the server or a model
skip (with the reason) when no full ComfyUI is found (``COMFYUI_PATH``, or the pack in
``ComfyUI/custom_nodes/``), when this interpreter lacks ComfyUI's requirements, or (SDXL) when memory is
short; set ``IDFUSE_E2E_REQUIRED=1`` to turn those skips into failures (e.g. in a CI job meant to run them).

Environment knobs: ``IDFUSE_E2E_STARTUP_TIMEOUT`` (s, default 180), ``IDFUSE_E2E_LOG_LEVEL``
(server ``--verbose``, default INFO), ``IDFUSE_E2E_SERVER_ARGS`` (extra main.py arguments),
``IDFUSE_E2E_CHECKPOINT_CACHE`` (a folder keeping the random checkpoints, ~2.1 GB SD1.5 and ~6.9 GB
SDXL, across sessions).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from comfy_env import ComfyInstall

from .harness.checkpoints import available_memory_gib, resident_memory_gib, write_random_checkpoint
from .harness.client import ComfyClient
from .harness.dirs import ServerDirs, prepare_base_dir
from .harness.locate import comfyui_version, full_comfyui, missing_requirements
from .harness.process import ComfyServer

log = logging.getLogger(__name__)

E2E_DIR = Path(__file__).resolve().parent
SD15_CHECKPOINT_NAME = "idfuse-e2e-random-sd15.safetensors"
SDXL_CHECKPOINT_NAME = "idfuse-e2e-random-sdxl.safetensors"
# Memory the SDXL e2e tests take, measured on a CPU-only machine (ComfyUI 0.8, the sum over the test process and the
# server): the server holds the checkpoint in fp32 (~13 GiB) from the first SDXL graph on; the token and Infinite-ID
# tests peak at 16.2 GiB, the trainer test (2 steps at 256 px with a rank-4 LoRA, then LoraLoader) at 19.8 GiB.
SDXL_SERVER_MEMORY_GIB = 20.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _unavailable(reason: str) -> None:
    if _env_flag("IDFUSE_E2E_REQUIRED"):
        pytest.fail(f"e2e tests required (IDFUSE_E2E_REQUIRED) but: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def comfyui_path(comfy_install: ComfyInstall) -> Path:
    """The session's ComfyUI (tests/conftest.py), when it is a full checkout the server can run from;
    skips the test otherwise."""
    location = full_comfyui(comfy_install)
    if location.path is None:
        _unavailable(location.reason)
    assert location.path is not None
    missing = missing_requirements()
    if missing:
        _unavailable(
            f"ComfyUI found at {location.path}, but this interpreter ({sys.executable}) lacks its "
            f"requirements: {', '.join(missing)} (pip install -r {location.path / 'requirements.txt'})"
        )
    log.info("e2e: ComfyUI %s at %s", comfyui_version(location.path), location.path)
    return location.path


@pytest.fixture(scope="session")
def comfy_dirs(comfyui_path: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerDirs:
    """The isolated ``--base-directory`` (models/, input/, output/, user/, custom_nodes/comfyui-idfuse)."""
    return prepare_base_dir(tmp_path_factory.mktemp("comfyui-base"))


@pytest.fixture(scope="session")
def comfy_server(comfyui_path: Path, comfy_dirs: ServerDirs) -> Iterator[ComfyServer]:
    """A ComfyUI server (``main.py --cpu``, 127.0.0.1, free port) with the pack loaded; stopped at the end."""
    timeout = float(os.environ.get("IDFUSE_E2E_STARTUP_TIMEOUT", "180"))
    server = ComfyServer(
        comfyui_path,
        comfy_dirs,
        extra_args=shlex.split(os.environ.get("IDFUSE_E2E_SERVER_ARGS", "")),
        log_level=os.environ.get("IDFUSE_E2E_LOG_LEVEL", "INFO"),
    )
    try:
        try:
            server.start(timeout=timeout)
        except Exception as error:  # reported with the server log's tail
            pytest.fail(f"ComfyUI server did not start: {error}", pytrace=False)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_client(comfy_server: ComfyServer) -> ComfyClient:
    """HTTP client of the session's server (queue_prompt, wait_for, run, run_ui_workflow, ...)."""
    return comfy_server.client


@pytest.fixture(scope="session")
def object_info(comfy_client: ComfyClient) -> dict[str, Any]:
    """``/object_info`` as the server answered it at first use (combo lists may be stale later)."""
    return comfy_client.object_info()


def _random_checkpoint(family: str, name: str, comfyui_path: Path, comfy_dirs: ServerDirs) -> Iterator[Path]:
    """The random ``family`` checkpoint in the server's models/checkpoints, kept in ``IDFUSE_E2E_CHECKPOINT_CACHE``
    (symlinked) when that names a folder, else written for the session and deleted at its end."""
    target = comfy_dirs.checkpoints / name
    cache = os.environ.get("IDFUSE_E2E_CHECKPOINT_CACHE")
    if cache:
        cached = write_random_checkpoint(Path(cache) / name, family, comfy_root=comfyui_path)
        if not target.is_symlink():
            target.symlink_to(cached.resolve())
    else:
        write_random_checkpoint(target, family, comfy_root=comfyui_path)
    yield target
    if not cache:
        target.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def sd15_checkpoint(comfyui_path: Path, comfy_dirs: ServerDirs) -> Iterator[Path]:
    """A random-weight SD1.5 checkpoint in the server's models/checkpoints (use ``.name`` in graphs).

    Written once per session (~20 s, ~2.1 GB fp16) and deleted at the end, unless
    ``IDFUSE_E2E_CHECKPOINT_CACHE`` names a folder to keep it in (then it is symlinked).
    """
    yield from _random_checkpoint("sd15", SD15_CHECKPOINT_NAME, comfyui_path, comfy_dirs)


def _memory_for_server_tests(server: ComfyServer, needed_gib: float, timeout: float = 60.0) -> float | None:
    """Memory (GiB) the test process and the session's server can reach: what they hold plus MemAvailable.

    When that is short, the server is first asked to drop its models and cached outputs: a whole-folder run
    reaches the SDXL tests with the SD1.5 checkpoint of earlier tests still loaded."""
    def reachable() -> float | None:
        available = available_memory_gib()
        if available is None:
            return None
        held = resident_memory_gib(os.getpid())
        if server.process is not None:
            held += resident_memory_gib(server.process.pid)
        return available + held

    memory = reachable()
    if memory is None or memory >= needed_gib:
        return memory
    server.client.free_memory(unload_models=True)  # ComfyUI acts on it between prompts: wait for the memory
    deadline = time.monotonic() + timeout
    while (memory or 0.0) < needed_gib and time.monotonic() < deadline:
        time.sleep(1.0)
        memory = reachable()
    return memory


@pytest.fixture(scope="session")
def sdxl_checkpoint(comfyui_path: Path, comfy_dirs: ServerDirs, comfy_server: ComfyServer) -> Iterator[Path]:
    """A random-weight SDXL checkpoint (CLIP-L + CLIP-G, ~6.9 GB fp16) in the server's models/checkpoints.

    Cached like ``sd15_checkpoint``. Skips (it is no failure of the pack; ``IDFUSE_E2E_REQUIRED`` makes it one)
    when the machine has less memory available than the server needs to load it and run the SDXL tests
    (``SDXL_SERVER_MEMORY_GIB``), even once the server has dropped the models of earlier tests.
    """
    memory = _memory_for_server_tests(comfy_server, SDXL_SERVER_MEMORY_GIB)
    if memory is not None and memory < SDXL_SERVER_MEMORY_GIB:
        _unavailable(f"the SDXL e2e tests need ~{SDXL_SERVER_MEMORY_GIB:.0f} GiB of memory for the test process and "
                     f"the server (ComfyUI loads the checkpoint in fp32 on the CPU); they hold and can get only "
                     f"{memory:.1f} GiB")
    yield from _random_checkpoint("sdxl", SDXL_CHECKPOINT_NAME, comfyui_path, comfy_dirs)


@pytest.fixture()
def face_models(comfy_dirs):
    """Synthetic buffalo_l models (what the example workflows pick), a FaceID encoder of the real SD1.5 widths and a face photo (input/face.png)."""
    import numpy as np
    from PIL import Image

    onnx_faces = pytest.importorskip("onnx_faces")
    pytest.importorskip("insightface")
    from ip_adapter_files import REAL, write_faceid

    onnx_faces.write_model_pack(comfy_dirs.model_folder("insightface"), "buffalo_l")
    encoder = comfy_dirs.model_folder("ipadapter") / "ip-adapter-faceid_sd15.bin"
    if not encoder.exists():
        write_faceid(encoder, "faceid", "sd15", REAL)
    photo = onnx_faces.tom_hanks()
    canvas = np.full((512, 512, 3), 128, np.uint8)
    canvas[144:368, 144:368] = np.asarray(Image.fromarray(photo).resize((224, 224), Image.BICUBIC))
    Image.fromarray(canvas).save(comfy_dirs.input / "face.png")


@pytest.fixture()
def sdxl_face_models(face_models, comfy_dirs):
    """``face_models`` plus a FaceID encoder of the real SDXL widths (2048-wide ID tokens, SDXL's attention
    processors and LoRA; ~1.07 GB in fp16) as ``ipadapter/ip-adapter-faceid_sdxl.bin``."""
    from ip_adapter_files import REAL, write_faceid

    encoder = comfy_dirs.model_folder("ipadapter") / "ip-adapter-faceid_sdxl.bin"
    if not encoder.exists():
        write_faceid(encoder, "faceid", "sdxl", REAL)
