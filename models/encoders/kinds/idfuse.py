"""IDFuse's own encoder, Infinite-ID style: c_id = concat(face-mapper tokens, CLIP-mapper tokens), the CLIP
mapper being a perceiver resampler with its own learned queries. The one kind saved in IDFuse's format.

The file: safetensors, metadata ``format`` = "idfuse.id_encoder", ``format_version``, ``model_family``,
``num_face_tokens``, ``num_clip_tokens``, ``embedding_space`` (the face embedding space it was trained on, a
name of ``models.faces.types.EMBEDDING_SPACES``; files written before it existed are read as
arcface-w600k-512, the space of every face model IDFuse offered then by default and of the FaceID files),
``training`` (JSON); tensors ``face_mapper.*``,
``clip_mapper.*`` (perceiver heads of 64 channels) and ``ip.<block key>.to_k.weight`` /
``.to_v.weight`` for every cross-attention layer of the family.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ...errors import IDEncoderError
from ...faces.types import EMBEDDING_SPACES, describe_embedding_space
from ...files import atomic_save_safetensors
from ...unet import CONTEXT_DIM, FAMILIES, block_keys
from ..checkpoint import Checkpoint
from ..modules import DIM_HEAD, FaceMapper, IDEncoder, PerceiverResampler
from .base import EncoderKind

log = logging.getLogger("idfuse.encoders")

FORMAT_NAME = "idfuse.id_encoder"
FORMAT_VERSION = 1


class IDFuse(EncoderKind):
    name = "idfuse"
    display_name = "IDFuse"
    expected = f"an IDFuse encoder (safetensors with metadata format={FORMAT_NAME!r})"
    needs_clip_vision = True
    learned_clip_queries = True

    def recognises(self, checkpoint: Checkpoint, **options) -> bool:
        return checkpoint.metadata.get("format") == FORMAT_NAME

    def build(self, checkpoint: Checkpoint) -> IDEncoder:
        meta, where = checkpoint.metadata, f"ID encoder {checkpoint.name}"
        try:
            version = int(meta.get("format_version", "0"))
        except ValueError as e:
            raise IDEncoderError(f"{where}: format_version {meta.get('format_version')!r} is not a number.") from e
        if version > FORMAT_VERSION:
            raise IDEncoderError(f"{where}: format version {version} is newer than this IDFuse supports "
                                 f"({FORMAT_VERSION}); update the pack.")
        family = meta.get("model_family")
        if family not in FAMILIES:
            raise IDEncoderError(f"{where}: model_family {family!r} is not one of {sorted(FAMILIES)}.")
        context = CONTEXT_DIM[family]
        face = FaceMapper.from_weights(checkpoint.take_prefix("face_mapper."), context, f"{where} face_mapper")
        clip = PerceiverResampler.from_weights(checkpoint.take_prefix("clip_mapper."), context, f"{where} clip_mapper")
        for key, actual in (("num_face_tokens", face.num_tokens), ("num_clip_tokens", clip.num_latents)):
            if meta.get(key) != str(actual):
                raise IDEncoderError(f"{where}: metadata {key}={meta.get(key)!r} but the weights make {actual} "
                                     f"tokens.")
        ip = {layer: (checkpoint.take(f"ip.{layer}.to_k.weight"), checkpoint.take(f"ip.{layer}.to_v.weight"))
              for layer in block_keys(family)}
        space = meta.get("embedding_space")
        if space is None:
            space = self.embedding_space
            log.info("%s has no embedding_space in its metadata (written before IDFuse recorded it): read as "
                     "trained on %s", checkpoint.name, describe_embedding_space(space))
        elif space not in EMBEDDING_SPACES:
            log.warning("%s: embedding_space %r is not one IDFuse knows (%s); its face embeddings cannot be checked",
                        checkpoint.name, space, ", ".join(EMBEDDING_SPACES))
        return IDEncoder.from_weights(self, family, face, clip, ip, {}, checkpoint.name, space)

    def encode(self, encoder: IDEncoder, face_embeds: torch.Tensor, clip_hidden: torch.Tensor | None,
               **options) -> torch.Tensor:
        return torch.cat([encoder.face_mapper(face_embeds), encoder.clip_mapper(clip_hidden)], dim=1)

    def metadata(self, encoder: IDEncoder, training: dict | None) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "model_family": encoder.family,
            "num_face_tokens": str(encoder.face_mapper.num_tokens),
            "num_clip_tokens": str(encoder.clip_mapper.num_latents),
            "embedding_space": encoder.embedding_space,
            "training": json.dumps(training or {}, sort_keys=True),
        }

    def save(self, encoder: IDEncoder, path: str | os.PathLike, training: dict | None) -> Path:
        tensors = {f"face_mapper.{n}": t for n, t in encoder.face_mapper.state_dict().items()}
        tensors.update({f"clip_mapper.{n}": t for n, t in encoder.clip_mapper.state_dict().items()})
        for layer in block_keys(encoder.family):
            projection = encoder.projection(layer)
            tensors[f"ip.{layer}.to_k.weight"] = projection.to_k.weight
            tensors[f"ip.{layer}.to_v.weight"] = projection.to_v.weight
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        return atomic_save_safetensors(tensors, path, self.metadata(encoder, training))


def create_idfuse_encoder(family: str, hidden_sizes: Mapping[tuple, int], num_face_tokens: int = 4,
                          num_clip_tokens: int = 16, face_hidden_dim: int = 1024, clip_mapper_dim: int | None = None,
                          clip_mapper_depth: int = 4, ff_mult: int = 4,
                          embedding_space: str = IDFuse.embedding_space) -> IDEncoder:
    """A freshly initialised IDFuse encoder to train.

    hidden_sizes: channel width of each cross-attention layer of the family (BlockKey or key tuple).
    clip_mapper_dim: the CLIP mapper's working width (heads of 64); None = the context width.
    embedding_space: the face embeddings it will be trained on (a name of EMBEDDING_SPACES: its width is the
    face mapper's input).
    """
    if embedding_space not in EMBEDDING_SPACES:
        raise IDEncoderError(f"Unknown embedding_space {embedding_space!r}; expected one of "
                             f"{list(EMBEDDING_SPACES)}.")
    if family not in FAMILIES:
        raise IDEncoderError(f"Unknown model family {family!r}; expected one of {sorted(FAMILIES)}.")
    context = CONTEXT_DIM[family]
    dim = clip_mapper_dim or context
    if dim % DIM_HEAD:
        raise IDEncoderError(f"clip_mapper_dim must be a multiple of {DIM_HEAD}, got {dim}.")
    face = FaceMapper(num_face_tokens, context, face_hidden_dim, EMBEDDING_SPACES[embedding_space].width)
    clip = PerceiverResampler(dim, clip_mapper_depth, dim // DIM_HEAD, ff_mult * dim, context,
                              num_latents=num_clip_tokens)
    return IDEncoder(IDFuse(), family, face, clip, hidden_sizes, embedding_space=embedding_space)
