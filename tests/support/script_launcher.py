"""Run a pack script the way a user does, but against the ComfyUI the tests use.

    python tests/support/script_launcher.py scripts/<name>.py [script args...]
    accelerate launch tests/support/script_launcher.py scripts/<name>.py [script args...]

It sets ComfyUI up as tests/conftest.py does (``comfy_env.setup_comfy()``: the pinned core unless COMFYUI_PATH
says otherwise, on the CPU, the pack imported as ``comfyui_idfuse``), then runs the script as ``__main__`` with
the remaining arguments, its folder first on ``sys.path`` as ``python <script>`` would have it.
"""

from __future__ import annotations

import os
import runpy
import sys

SUPPORT_DIR = os.path.dirname(os.path.abspath(__file__))


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
