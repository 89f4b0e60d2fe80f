"""What a script run from a shell needs from its host: the pack imported as a package, and ComfyUI.

Scripts run as ``python scripts/<name>.py`` or ``accelerate launch scripts/<name>.py`` (Python puts
``scripts/`` on ``sys.path``, so ``import host`` works). ``pack()`` makes ``comfyui_idfuse.models...``
importable with no ComfyUI at all; ``comfy()`` finds ComfyUI, tells it whether it runs on a CPU, and then
``comfyui_idfuse.nodes...`` can be imported too.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

PACKAGE_NAME = "comfyui_idfuse"  # the name tests/support/comfy_env.py imports the pack under
# As reached (not resolved): a pack symlinked into ComfyUI/custom_nodes/ still finds that ComfyUI.
PACK_DIR_AS_SEEN = Path(os.path.abspath(__file__)).parents[1]
PACK_ROOT = PACK_DIR_AS_SEEN.resolve()


def pack() -> ModuleType:
    """The pack as package ``comfyui_idfuse`` without running its ``__init__.py`` (which imports the nodes, and
    so ComfyUI): its submodules are found through the package's path as usual. Idempotent; an already imported
    pack (the tests import it fully) is returned as it is."""
    loaded = sys.modules.get(PACKAGE_NAME)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(
        PACKAGE_NAME, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = module
    return module


def _is_comfy_root(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file()


def find_comfy(comfyui_path: str | None = None, environ: Mapping[str, str] | None = None,
               pack_dir: Path = PACK_DIR_AS_SEEN) -> Path:
    """ComfyUI's root folder: ``comfyui_path``, else ``COMFYUI_PATH``, else an ancestor when the pack sits in
    ``ComfyUI/custom_nodes/``, else where an importable ``comfy`` package lives. Raises IDFuseInputError."""
    pack()
    errors = importlib.import_module(f"{PACKAGE_NAME}.models.errors")
    env = os.environ if environ is None else environ
    for given, what in ((comfyui_path, "--comfyui"), (env.get("COMFYUI_PATH"), "COMFYUI_PATH")):
        if given:
            root = Path(given).expanduser().resolve()
            if not _is_comfy_root(root):
                raise errors.IDFuseInputError(
                    f"{what}={given} is not a ComfyUI folder (it has no comfy/model_patcher.py); give the folder "
                    f"that holds ComfyUI's main.py.")
            return root
    for candidate in dict.fromkeys([pack_dir, pack_dir.resolve()]):
        for parent in candidate.parents:
            if parent.name == "custom_nodes" and _is_comfy_root(parent.parent):
                return parent.parent
    spec = importlib.util.find_spec("comfy")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).parent
    raise errors.IDFuseInputError(
        "ComfyUI not found: pass --comfyui <ComfyUI folder> or set COMFYUI_PATH (or install the pack in "
        "ComfyUI/custom_nodes/).")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ComfyUI's CPU default is sub-quadratic chunked attention, made for inference: trained through, every chunk is
# kept for the backward pass. torch's fused attention is what ComfyUI itself picks on NVIDIA GPUs.
CPU_ARGS = ("--cpu", "--use-pytorch-cross-attention")


def comfy(comfyui_path: str | None = None, cpu: bool | None = None) -> Path:
    """Make ComfyUI importable (see :func:`find_comfy`) and return its root.

    ComfyUI decides its device when ``comfy.model_management`` is first imported, from its command-line
    arguments; so, before that, it gets ``CPU_ARGS`` when ``cpu`` is True (or None and CUDA is unavailable), parsed
    as ComfyUI's main does. The script's own arguments are hidden from ComfyUI's parser meanwhile (it would refuse
    them). Once ComfyUI is set up, later calls change nothing.
    """
    pack()
    root = find_comfy(comfyui_path)
    # ComfyUI's root goes first: its nodes.py and folder_paths.py must win over anything of the same name.
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    if "comfy.model_management" not in sys.modules and "comfy.cli_args" not in sys.modules:
        if cpu is None:
            cpu = not _cuda_available()
        import comfy.options

        saved = sys.argv
        sys.argv = [saved[0] if saved else "comfyui"] + (list(CPU_ARGS) if cpu else [])
        try:
            comfy.options.enable_args_parsing()
            import comfy.cli_args  # noqa: F401  (parses the arguments above)
        finally:
            sys.argv = saved
    return root
