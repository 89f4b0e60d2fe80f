"""What the IP-Adapter FaceID kinds share: the ``ip_adapter.*`` half of their files (the ID keys/values
and the LoRA of every attention processor) and the recognition of IP-Adapters that are not FaceID.

IP-Adapter files number their weights by attention processor in diffusers' order
(``models.encoders.processor_order``): ``ip_adapter.N.to_k_ip.weight`` / ``to_v_ip`` for each
cross-attention processor, ``ip_adapter.N.to_{q,k,v,out}_lora.{down,up}.weight`` for every processor
(the LoRA of the released files, rank 128; FaceID-Portrait has none). The family comes from the
to_k_ip input width (768: SD1.5, 2048: SDXL). The ``image_proj.*`` half differs by kind.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ...errors import IDEncoderError, UnsupportedModelError
from ...faces.types import ARCFACE_W600K_512
from ...unet import FAMILY_NAMES, BlockKey, family_from_context_dim
from ..checkpoint import Checkpoint
from ..modules import FACE_EMBEDDING_DIM, FaceMapper, IDEncoder, PerceiverResampler
from .base import EncoderKind

FACE_MAPPER_KEYS = frozenset({"proj.0.weight", "proj.2.weight", "norm.weight"})  # under image_proj.
RESAMPLER_PREFIX = "perceiver_resampler."  # under image_proj.: FaceID-Plus / PlusV2
IP_ADAPTER_KEYS = "ip_adapter.1.to_k_ip.weight, ip_adapter.0.to_q_lora.down.weight ..."

# image_proj keys of the IP-Adapters that encode CLIP image features instead of a face embedding.
IMAGE_IP_ADAPTERS = (("latents", "IP-Adapter Plus / Plus-Face (resampler of CLIP image features)"),
                     ("proj.3.weight", "IP-Adapter Full-Face (MLP of CLIP image features)"),
                     ("proj.weight", "IP-Adapter (CLIP image embedding)"))

# IP-Adapter's LoRA modules of a processor and the attention weight of ComfyUI's UNet each one changes.
LORA_TARGETS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


def is_ip_adapter(checkpoint: Checkpoint) -> bool:
    return any(k.startswith(("image_proj.", "ip_adapter.")) for k in checkpoint.tensors)


def image_proj_keys(checkpoint: Checkpoint) -> set[str]:
    return set(checkpoint.keys_under("image_proj."))


def has_face_mapper(checkpoint: Checkpoint) -> bool:
    """image_proj holds FaceID's MLP of a 512-wide face embedding (IP-Adapter's MLPProjModel)."""
    keys = image_proj_keys(checkpoint)
    proj_in = checkpoint.tensors.get("image_proj.proj.0.weight")
    return FACE_MAPPER_KEYS <= keys and "proj.3.weight" not in keys \
        and proj_in is not None and proj_in.shape[-1] == FACE_EMBEDDING_DIM


def has_resampler(checkpoint: Checkpoint) -> bool:
    return f"{RESAMPLER_PREFIX}proj_in.weight" in image_proj_keys(checkpoint)


def _context_width(checkpoint: Checkpoint, key: str) -> tuple[str, int]:
    width = checkpoint.tensors[key].shape[1] if checkpoint.tensors[key].ndim == 2 else None
    try:
        return family_from_context_dim(width), width
    except UnsupportedModelError as e:
        raise IDEncoderError(f"{checkpoint.name}: {key} takes a {width}-wide context; IDFuse supports SD1.5 (768) "
                             f"and SDXL (2048) encoders.") from e


def _lora(checkpoint: Checkpoint, order: tuple, hidden: Mapping[BlockKey, int],
          context: int) -> dict[str, dict[str, torch.Tensor]]:
    """The LoRA of every processor under ComfyUI weight names; {} for files without one (e.g. FaceID-Portrait)."""
    from ..processor_order import CROSS_ATTENTION, comfy_attention_weight

    if not any("_lora." in k for k in checkpoint.keys_under("ip_adapter.")):
        return {}
    lora = {}
    for p in order:
        for module, projection in LORA_TARGETS.items():
            prefix = f"ip_adapter.{p.number}.{module}."
            down, up = checkpoint.take(prefix + "down.weight"), checkpoint.take(prefix + "up.weight")
            reads_context = p.attention == CROSS_ATTENTION and projection in ("to_k", "to_v")
            width_in = context if reads_context else hidden[p.layer]
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] \
                    or (up.shape[0], down.shape[1]) != (hidden[p.layer], width_in):
                raise IDEncoderError(
                    f"{checkpoint.name}: LoRA {prefix}down/up have shapes {tuple(down.shape)} / {tuple(up.shape)}; "
                    f"expected (rank, {width_in}) / ({hidden[p.layer]}, rank) for layer {p.layer}.")
            lora[comfy_attention_weight(p.layer, p.attention, projection)] = {"down": down, "up": up}
    return lora


class IPAdapterKind(EncoderKind):
    """An IP-Adapter FaceID kind: subclasses say how ``image_proj`` is recognised and read."""

    # FaceID, FaceID-Plus and PlusV2 were trained on insightface buffalo_l's normed w600k_r50 embeddings (the
    # reference's FaceAnalysis default and its FaceID README); their files do not say so themselves.
    embedding_space = ARCFACE_W600K_512

    def mappers(self, checkpoint: Checkpoint, context_dim: int,
                where: str) -> tuple[FaceMapper, PerceiverResampler | None]:
        """The face mapper and CLIP mapper of the file's ``image_proj.*``."""
        raise NotImplementedError

    @staticmethod
    def face_mapper(checkpoint: Checkpoint, context_dim: int, where: str) -> FaceMapper:
        weights = {k: v for k, v in checkpoint.take_prefix("image_proj.").items() if not k.startswith(RESAMPLER_PREFIX)}
        return FaceMapper.from_weights(weights, context_dim, f"{where} image_proj")

    def build(self, checkpoint: Checkpoint) -> IDEncoder:
        from ..processor_order import cross_attention_processors, processors

        found = sorted(int(m[1]) for k in checkpoint.keys_under("ip_adapter.")
                       if (m := re.fullmatch(r"(\d+)\.to_k_ip\.weight", k)))
        if not found:
            raise IDEncoderError(f"{checkpoint.name}: no ip_adapter.N.to_k_ip.weight tensors; expected "
                                 f"{self.expected}.")
        family, context = _context_width(checkpoint, f"ip_adapter.{found[0]}.to_k_ip.weight")
        cross = cross_attention_processors(family)
        if found != [p.number for p in cross]:
            raise IDEncoderError(
                f"{checkpoint.name}: has to_k_ip for {len(found)} processors ({found[:4]}...), but an "
                f"{FAMILY_NAMES[family]} IP-Adapter has them for its {len(cross)} cross-attention processors "
                f"({[p.number for p in cross][:4]}...); the file is incomplete or for another UNet.")
        where = f"{checkpoint.name} ({self.display_name}, {FAMILY_NAMES[family]})"
        face, clip = self.mappers(checkpoint, context, where)
        ip = {p.layer: (checkpoint.take(f"ip_adapter.{p.number}.to_k_ip.weight"),
                        checkpoint.take(f"ip_adapter.{p.number}.to_v_ip.weight")) for p in cross}
        hidden = {layer: to_k.shape[0] for layer, (to_k, _) in ip.items()}
        lora = _lora(checkpoint, processors(family), hidden, context)
        return IDEncoder.from_weights(self, family, face, clip, ip, lora, checkpoint.name)

    def why_not(self, checkpoint: Checkpoint) -> str | None:
        if not is_ip_adapter(checkpoint):
            return None
        keys = image_proj_keys(checkpoint)
        for key, description in IMAGE_IP_ADAPTERS:
            if key in keys:
                return (f"{checkpoint.name} is an {description}, not a FaceID checkpoint: it encodes images, not "
                        f"face-recognition embeddings. Use IP-Adapter FaceID, FaceID-Plus or FaceID-PlusV2 (e.g. "
                        f"ip-adapter-faceid-plusv2_sd15.bin) instead.")
        return (f"{checkpoint.name}: has IP-Adapter parts but an unknown image_proj ({sorted(keys)[:5]}); an "
                f"IP-Adapter FaceID file has image_proj.{{{', '.join(sorted(FACE_MAPPER_KEYS))}}} (a 512-wide face "
                f"embedding in) and, for FaceID-Plus / PlusV2, image_proj.{RESAMPLER_PREFIX}*.")
