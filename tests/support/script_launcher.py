"""Run a pack script the way a user does, but against the ComfyUI the tests use.

    python tests/support/script_launcher.py scripts/<name>.py [script args...]
    accelerate launch tests/support/script_launcher.py scripts/<name>.py [script args...]

It sets ComfyUI up as tests/conftest.py does (``comfy_env.setup_comfy()``: the pinned core unless COMFYUI_PATH
says otherwise, on the CPU, the pack imported as ``comfyui_idfuse``), then runs the script as ``__main__`` with
the remaining arguments, its folder first on ``sys.path`` as ``python <script>`` would have it.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

SUPPORT_DIR = os.path.dirname(os.path.abspath(__file__))
SCRIPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(SUPPORT_DIR)), "scripts")


@contextmanager
def imported_script(name: str, module_name: str) -> Iterator[ModuleType]:
    """``scripts/<name>.py`` imported in-process as ``module_name`` (its folder on sys.path, as ``python <script>``
    has it), for tests that call its functions; unregistered afterwards."""
    if SCRIPTS_DIR not in sys.path:
        sys.path.insert(0, SCRIPTS_DIR)
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(SCRIPTS_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: script_launcher.py <script.py> [args...]")
    script, *args = argv
    if SUPPORT_DIR not in sys.path:
        sys.path.insert(0, SUPPORT_DIR)
    import comfy_env

    comfy_env.setup_comfy()
    script = os.path.abspath(script)
    sys.path.insert(0, os.path.dirname(script))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
