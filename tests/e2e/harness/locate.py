"""Whether the session's ComfyUI can run a server, and whether this interpreter can run it.

Where ComfyUI is comes from the tests' one locator, ``comfy_env`` (``COMFYUI_PATH``, or an
ancestor ``ComfyUI/custom_nodes/<pack>``, else the pinned core); the e2e tests need that to be a
full checkout with its server.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from comfy_env import FULL_COMFYUI_FILES, ComfyInstall, locate_comfy

# Distributions the server needs to start at all (import names differ; these are what pip sees).
# Optional ones ComfyUI itself tolerates (torchaudio, av, kornia, spandrel, ...) are left out.
ESSENTIAL_DISTRIBUTIONS = (
    "torch",
    "torchsde",
    "numpy",
    "einops",
    "transformers",
    "tokenizers",
    "safetensors",
    "aiohttp",
    "yarl",
    "PyYAML",
    "Pillow",
    "scipy",
    "tqdm",
    "psutil",
    "av",
    "requests",
    "comfyui-frontend-package",
)


@dataclass(frozen=True)
class ComfyLocation:
    """Where a full ComfyUI is, or why there is none (``path`` is then ``None``)."""

    path: Path | None
    reason: str


def full_comfyui(install: ComfyInstall | None = None) -> ComfyLocation:
    """The full ComfyUI of ``install`` (default: what ``comfy_env.locate_comfy`` finds), or why there is none."""
    if install is None:
        install = locate_comfy()
    if install is None or install.is_pinned_core:
        return ComfyLocation(
            None,
            "no full ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout (main.py, server.py, "
            "nodes.py, folder_paths.py, comfy/) or put the pack in ComfyUI/custom_nodes/",
        )
    if not install.is_full:
        return ComfyLocation(
            None,
            f"{install.found_by} is not a full ComfyUI checkout (needs {', '.join(FULL_COMFYUI_FILES)} and comfy/)",
        )
    return ComfyLocation(install.root, install.found_by)


def missing_requirements(distributions: Iterable[str] = ESSENTIAL_DISTRIBUTIONS) -> list[str]:
    """Distributions this interpreter lacks among those the server needs to start."""
    missing = []
    for name in distributions:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def comfyui_version(comfy_root: Path) -> str:
    version_file = comfy_root / "comfyui_version.py"
    if version_file.is_file():
        match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", version_file.read_text(encoding="utf-8"))
        if match:
            return match.group(1)
    return "unknown"
