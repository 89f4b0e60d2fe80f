"""The identity-token file: per-stage K/V word vectors of SeFi-IDE, stored as safetensors.

Tensors
    ``keys.<encoder>``    (S, D)  word vectors used for the cross-attention keys, per stage
    ``values.<encoder>``  (S, D)  word vectors used for the cross-attention values, per stage
    ``generator.<name>``  any     optional weights of the generator block (to resume training)
Metadata (all strings)
    ``format`` = "idfuse.id_tokens", ``format_version``, ``model_family`` (sd15 | sdxl),
    ``num_stages``, ``encoders`` (JSON {name: width}), ``placeholder``, ``initializer``,
    ``training`` (JSON, free-form: how the tokens were made).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import IDTokensError
from ..files import atomic_save_safetensors, read_safetensors
from ..unet import FAMILY_NAMES

FORMAT_NAME = "idfuse.id_tokens"
FORMAT_VERSION = 1

# The text encoders of each family and their word-embedding widths.
ENCODERS: dict[str, dict[str, int]] = {
    "sd15": {"clip_l": 768},
    "sdxl": {"clip_l": 768, "clip_g": 1280},
}


@dataclass
class IDTokens:
    family: str
    placeholder: str
    initializer: str
    keys: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    generator: dict[str, torch.Tensor] = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    source: str = "<memory>"

    @property
    def num_stages(self) -> int:
        return next(iter(self.keys.values())).shape[0]

    def validate(self) -> None:
        where = f"Identity tokens {self.source}"
        if self.family not in ENCODERS:
            raise IDTokensError(f"{where}: unknown model family '{self.family}' (expected one of {sorted(ENCODERS)}).")
        expected = ENCODERS[self.family]
        tables = (("keys", self.keys), ("values", self.values))
        for kind, table in tables:
            if set(table) != set(expected):
                raise IDTokensError(
                    f"{where}: {kind} has vectors for encoders {sorted(table)}, but a "
                    f"{FAMILY_NAMES[self.family]} identity needs {sorted(expected)}.")
            for name, tensor in table.items():
                # Before num_stages is read: it is the first dimension of these tensors.
                if tensor.ndim != 2:
                    raise IDTokensError(
                        f"{where}: {kind}.{name} is a {tensor.ndim}-dimensional tensor of shape "
                        f"{tuple(tensor.shape)}, expected (stages, {expected[name]}); the file is damaged.")
        for kind, table in tables:
            for name, width in expected.items():
                tensor = table[name]
                if tensor.shape[1] != width or tensor.shape[0] != self.num_stages:
                    raise IDTokensError(
                        f"{where}: {kind}.{name} has shape {tuple(tensor.shape)}, expected "
                        f"({self.num_stages}, {width}) for {FAMILY_NAMES[self.family]}.")
                if not torch.isfinite(tensor).all():
                    raise IDTokensError(f"{where}: {kind}.{name} contains NaN or infinite values.")
        if self.num_stages < 1:
            raise IDTokensError(f"{where}: needs at least one stage.")
        for word, label in ((self.placeholder, "placeholder"), (self.initializer, "initializer")):
            if not word or any(c.isspace() for c in word):
                raise IDTokensError(f"{where}: the {label} word must be one word, got {word!r}.")

    def check_family(self, family: str) -> None:
        if family != self.family:
            raise IDTokensError(
                f"Identity tokens {self.source} were made for {FAMILY_NAMES.get(self.family, self.family)}, "
                f"but the model is {FAMILY_NAMES.get(family, family)}. Use tokens trained for this model "
                f"family, or load a {FAMILY_NAMES.get(self.family, self.family)} checkpoint.")

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "model_family": self.family,
            "num_stages": str(self.num_stages),
            "encoders": json.dumps(ENCODERS[self.family]),
            "placeholder": self.placeholder,
            "initializer": self.initializer,
            "training": json.dumps(self.training, sort_keys=True),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"keys.{n}": t for n, t in self.keys.items()}
        tensors.update({f"values.{n}": t for n, t in self.values.items()})
        tensors.update({f"generator.{n}": t for n, t in self.generator.items()})
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}

    def save(self, path: str | os.PathLike) -> Path:
        self.validate()
        return atomic_save_safetensors(self.state_dict(), path, self.metadata())


def load_id_tokens(path: str | os.PathLike) -> IDTokens:
    path = Path(path)
    tensors, meta = read_safetensors(path, IDTokensError, "Identity tokens")
    where = f"Identity tokens {path.name}"
    if meta.get("format") != FORMAT_NAME:
        raise IDTokensError(
            f"{where}: not an IDFuse identity-token file (metadata format={meta.get('format')!r}, "
            f"expected {FORMAT_NAME!r}). Token files are made by IDFuse Train Identity.")
    version = _whole_number(meta, "format_version", where)
    if version is not None and version > FORMAT_VERSION:
        raise IDTokensError(f"{where}: format version {version} is newer than this IDFuse supports "
                            f"({FORMAT_VERSION}); update the pack.")
    try:
        tokens = IDTokens(
            family=meta["model_family"],
            placeholder=meta["placeholder"],
            initializer=meta["initializer"],
            keys={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("keys.")},
            values={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("values.")},
            generator={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("generator.")},
            training=json.loads(meta.get("training", "{}")),
            source=path.name,
        )
    except KeyError as e:
        raise IDTokensError(f"{where}: the metadata has no {e.args[0]!r} entry; the file is incomplete.") from e
    except json.JSONDecodeError as e:
        raise IDTokensError(f"{where}: the metadata entry 'training' is not valid JSON ({e}).") from e
    if not isinstance(tokens.training, dict):
        raise IDTokensError(f"{where}: the metadata entry 'training' is a JSON {type(tokens.training).__name__}, "
                            f"expected an object.")
    if not tokens.keys:
        raise IDTokensError(f"{where}: holds no keys.* vectors.")
    tokens.validate()
    declared = _whole_number(meta, "num_stages", where)
    if declared is not None and declared != tokens.num_stages:
        raise IDTokensError(f"{where}: metadata says {declared} stages but the vectors have {tokens.num_stages}.")
    return tokens


def _whole_number(meta: dict[str, str], name: str, where: str) -> int | None:
    """A metadata entry that must be a whole number; None when the file has none."""
    if name not in meta:
        return None
    try:
        return int(meta[name])
    except ValueError as e:
        raise IDTokensError(f"{where}: the metadata entry {name!r} is {meta[name]!r}, not a whole number; the file "
                            f"is damaged or was not written by IDFuse.") from e
