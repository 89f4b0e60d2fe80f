"""IP-Adapter FaceID-Plus and FaceID-PlusV2: the face tokens are the queries of a perceiver resampler over
the CLIP vision hidden states (OpenCLIP ViT-H/14 ``hidden_states[-2]``, 257 x 1280).

Plus: tokens = the resampler's output. PlusV2: face tokens + shortcut_scale * resampler output.
Their files have identical keys and shapes (``image_proj.perceiver_resampler.*`` besides FaceID's
``image_proj``): only inference differs, so, as in ComfyUI_IPAdapter_plus, PlusV2 is told by the
file name containing "plusv2" (also "plus_v2", "plus-v2"); the loader's ``plus_v2`` overrides the name.
"""

from __future__ import annotations

import re

import torch

from ...errors import IDEncoderError
from ..checkpoint import Checkpoint
from ..modules import FaceMapper, IDEncoder, PerceiverResampler
from .ip_adapter import IP_ADAPTER_KEYS, RESAMPLER_PREFIX, IPAdapterKind, has_face_mapper, has_resampler, is_ip_adapter


def is_plus_v2_name(name: str) -> bool:
    """Whether a file name says FaceID-PlusV2 ("plusv2", "plus_v2", "plus-v2", any case)."""
    return "plusv2" in re.sub(r"[-_ .]", "", name.lower())


class FaceIDPlus(IPAdapterKind):
    name = "faceid_plus"
    display_name = "IP-Adapter FaceID-Plus"
    expected = (f"an IP-Adapter FaceID-Plus checkpoint (keys image_proj.proj.0.weight, image_proj.norm.weight, "
                f"image_proj.{RESAMPLER_PREFIX}*, {IP_ADAPTER_KEYS})")
    needs_clip_vision = True
    plus_v2 = False  # which of the two, told by the file name or the loader's plus_v2

    def recognises(self, checkpoint: Checkpoint, plus_v2: bool | None = None, **options) -> bool:
        if not (is_ip_adapter(checkpoint) and has_face_mapper(checkpoint) and has_resampler(checkpoint)):
            return False
        return (is_plus_v2_name(checkpoint.name) if plus_v2 is None else plus_v2) == self.plus_v2

    def mappers(self, checkpoint: Checkpoint, context_dim: int,
                where: str) -> tuple[FaceMapper, PerceiverResampler | None]:
        clip = PerceiverResampler.from_weights(checkpoint.take_prefix(f"image_proj.{RESAMPLER_PREFIX}"), context_dim,
                                               f"{where} perceiver_resampler")
        face = self.face_mapper(checkpoint, context_dim, where)
        if clip.proj_in.out_features != context_dim:
            raise IDEncoderError(f"{where}: the resampler is {clip.proj_in.out_features} wide; its queries are the "
                                 f"{context_dim}-wide face tokens.")
        return face, clip

    def encode(self, encoder: IDEncoder, face_embeds: torch.Tensor, clip_hidden: torch.Tensor | None,
               **options) -> torch.Tensor:
        return encoder.clip_mapper(clip_hidden, latents=encoder.face_mapper(face_embeds))

    def loaded_note(self, encoder: IDEncoder) -> str | None:
        return ("FaceID-Plus weights and no 'plusv2' in the name, so used as FaceID-Plus (v1). If it is a "
                "FaceID-PlusV2 file, rename it to contain 'plusv2'.")


class FaceIDPlusV2(FaceIDPlus):
    name = "faceid_plusv2"
    display_name = "IP-Adapter FaceID-PlusV2"
    expected = ("an IP-Adapter FaceID-PlusV2 checkpoint (the keys of FaceID-Plus, and 'plusv2' in the file "
                "name)")
    plus_v2 = True

    def encode(self, encoder: IDEncoder, face_embeds: torch.Tensor, clip_hidden: torch.Tensor | None,
               shortcut_scale: float = 1.0, **options) -> torch.Tensor:
        face_tokens = encoder.face_mapper(face_embeds)
        return face_tokens + shortcut_scale * encoder.clip_mapper(clip_hidden, latents=face_tokens)

    def loaded_note(self, encoder: IDEncoder) -> str | None:
        return None
