"""Reading an ID-encoder file into a ``Checkpoint``: its tensors under flat names, its metadata, and which
tensors the kind that builds it used (a file with tensors no kind uses is not what it looks like).

``.safetensors`` files are read by ``models.files.read_safetensors``; ``.bin`` / ``.pt`` files with
``torch.load(weights_only=True)`` only, which unpickles tensors and plain containers and refuses
anything else, so a file can never run code.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import IDEncoderError
from ..files import read_safetensors

SAFETENSORS_SUFFIXES = frozenset({".safetensors", ".sft"})
TORCH_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt"})

# Sentences of PyTorch's weights_only refusal that do not apply here: its advice to load the file with
# weights_only=False would run the file's code, the very thing the refusal protects against.
_UNSAFE_ADVICE = re.compile(r"weights[_ ]only|re-?run|torch\.load|trusted source|https?://", re.IGNORECASE)


@dataclass
class Checkpoint:
    """A checkpoint's tensors under flat names ("image_proj.norm.weight"), recording which were used."""

    name: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)

    def take(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise IDEncoderError(f"{self.name}: tensor {key!r} is missing; the file is incomplete or not the "
                                 f"kind it looks like.")
        self.used.add(key)
        return self.tensors[key]

    def take_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors under ``prefix``, with the prefix removed."""
        return {k[len(prefix):]: self.take(k) for k in list(self.tensors) if k.startswith(prefix)}

    def keys_under(self, prefix: str) -> list[str]:
        return [k[len(prefix):] for k in self.tensors if k.startswith(prefix)]

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def _flatten(tree: Mapping, name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            flat[full] = value
        elif isinstance(value, Mapping):
            flat.update(_flatten(value, name, f"{full}."))
        else:
            raise IDEncoderError(f"{name}: entry {full!r} is of type {type(value).__name__}, not a tensor; an ID "
                                 f"encoder file holds tensors (in nested dicts) only.")
    return flat


def _refusal_detail(error: pickle.UnpicklingError) -> str:
    """What PyTorch's weights_only loader refused, without its advice to load the file unsafely."""
    text = str(error)
    if found := re.search(r"GLOBAL ([\w.]+)", text):
        return f"It refers to {found[1]}"
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return " ".join(s for s in sentences if s and not _UNSAFE_ADVICE.search(s))


def _read_torch(path: Path) -> Checkpoint:
    try:
        tree = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # "from None": the chained original would show PyTorch's advice to load the file unsafely.
        detail = _refusal_detail(e).rstrip(".")
        raise IDEncoderError(
            f"{path.name}: refused to load: it contains Python objects other than tensors, and IDFuse reads "
            f".bin files with PyTorch's safe loader only, which never runs a file's code. Use a .safetensors "
            f"version of the file, or convert it with a tool you trust.{f' ({detail}.)' if detail else ''}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise IDEncoderError(f"{path.name}: not a readable PyTorch checkpoint ({e}).") from e
    if not isinstance(tree, Mapping):
        raise IDEncoderError(f"{path.name}: holds a {type(tree).__name__}, expected a dict of tensors.")
    return Checkpoint(path.name, _flatten(tree, path.name))


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Tensors of a .safetensors file, or of a .bin/.pt read with ``torch.load(weights_only=True)`` only."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES | TORCH_SUFFIXES:
        raise IDEncoderError(f"{path.name}: unsupported file type {suffix!r}; ID encoders are "
                             f"{sorted(SAFETENSORS_SUFFIXES | TORCH_SUFFIXES)} files.")
    if path.is_file() and path.stat().st_size == 0:
        raise IDEncoderError(f"{path.name}: the file is empty (0 bytes), probably an interrupted download or copy; "
                             f"download it again.")
    if suffix in SAFETENSORS_SUFFIXES:
        tensors, metadata = read_safetensors(path, IDEncoderError, "ID encoder")
        return Checkpoint(path.name, tensors, metadata)
    return _read_torch(path)
