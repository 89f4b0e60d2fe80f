"""Files: atomic writes and the one safetensors reader. Every file the pack writes goes through here,
so a crash or a full disk never leaves half a file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import IDFuseError

# Temporary files: ".<final name>." + mkstemp's 8 random characters + ".tmp", beside the final file.
TEMPORARY_SUFFIX = ".tmp"
_RANDOM_CHARACTERS = 8


def temporary_name(final_name: str) -> str:
    """The (longest) name atomic_write gives the temporary file of ``final_name``: names that will be
    created can be checked against the file system's limit before any work."""
    return f".{final_name}.{'x' * _RANDOM_CHARACTERS}{TEMPORARY_SUFFIX}"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(temporary_path)``, then rename onto ``path``: a temporary file in the same folder, so
    the rename is atomic, removed again if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def read_safetensors(path: str | os.PathLike, error: type[IDFuseError] = IDFuseError,
                     what: str = "File") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; an unreadable file raises ``error`` naming it."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{what} {path.name}: not a readable safetensors file ({e}).") from e
