"""IP-Adapter FaceID: tokens = face mapper (MLP 512 -> 1024 -> T*C, LayerNorm(C)); no CLIP vision.

Its ``image_proj`` is IP-Adapter's MLPProjModel: ``proj.0`` (1024, 512), ``proj.2`` (T*C, 1024),
``norm`` (C), with no perceiver resampler.
"""

from __future__ import annotations

import torch

from ..checkpoint import Checkpoint
from ..modules import FaceMapper, IDEncoder, PerceiverResampler
from .ip_adapter import IP_ADAPTER_KEYS, IPAdapterKind, has_face_mapper, has_resampler, is_ip_adapter


class FaceID(IPAdapterKind):
    name = "faceid"
    display_name = "IP-Adapter FaceID"
    expected = (f"an IP-Adapter FaceID checkpoint (keys image_proj.proj.0.weight, image_proj.norm.weight, "
                f"{IP_ADAPTER_KEYS})")
    needs_clip_vision = False

    def recognises(self, checkpoint: Checkpoint, **options) -> bool:
        return is_ip_adapter(checkpoint) and has_face_mapper(checkpoint) and not has_resampler(checkpoint)

    def mappers(self, checkpoint: Checkpoint, context_dim: int,
                where: str) -> tuple[FaceMapper, PerceiverResampler | None]:
        return self.face_mapper(checkpoint, context_dim, where), None

    def encode(self, encoder: IDEncoder, face_embeds: torch.Tensor, clip_hidden: torch.Tensor | None,
               **options) -> torch.Tensor:
        return encoder.face_mapper(face_embeds)
