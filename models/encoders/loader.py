"""Loading an ID encoder: read the file, let the one kind that recognises it build the encoder, and make
sure the encoder used every tensor of the file."""

from __future__ import annotations

import os

import torch

from ..errors import IDEncoderError
from . import kinds
from .checkpoint import Checkpoint, read_checkpoint
from .modules import IDEncoder


def build_id_encoder(ckpt: Checkpoint, plus_v2: bool | None = None, dtype: torch.dtype = torch.float32) -> IDEncoder:
    """Recognise the checkpoint's kind and build its encoder (weights and LoRA in ``dtype``).

    Every tensor of the file must be used; ``ckpt.used`` records which were.
    """
    kind = kinds.recognised_kind(ckpt, plus_v2=plus_v2)
    encoder = kind.build(ckpt)
    unused = ckpt.unused()
    if unused:
        raise IDEncoderError(f"{ckpt.name}: has tensors that {kind.display_name} checkpoints do not have: "
                             f"{unused[:4]} ({len(unused)} in all); the file is not what it looks like.")
    encoder.lora = {name: {part: t.to(dtype) for part, t in pair.items()} for name, pair in encoder.lora.items()}
    return encoder.to(dtype)


def load_id_encoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    plus_v2: bool | None = None) -> IDEncoder:
    """Load an ID encoder from an IDFuse file or an IP-Adapter FaceID / FaceID-Plus / FaceID-PlusV2 checkpoint.

    The kind and family come from the keys and shapes (``models.encoders.kinds``); FaceID-Plus and
    FaceID-PlusV2 files are told apart by the file name containing "plusv2", which ``plus_v2``
    overrides. ``.bin`` files are read with ``torch.load(weights_only=True)`` only.
    """
    return build_id_encoder(read_checkpoint(path), plus_v2, dtype)
