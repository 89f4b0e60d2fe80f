"""Infinite-ID's ID encoder: face mapper, CLIP mapper and per-layer ID cross-attention K/V.

An encoder turns a face-recognition embedding (ArcFace, 512) and, for some kinds, CLIP vision
hidden states (OpenCLIP ViT-H/14 ``hidden_states[-2]``, 257 x 1280) into ID tokens (T, C),
C = the UNet's context width; each cross-attention layer projects them with its own to_k / to_v
(no bias).

``modules``          the torch modules and ``IDEncoder``
``checkpoint``       reading .safetensors / .bin files into a ``Checkpoint``
``kinds``            one file per kind (IP-Adapter FaceID, FaceID-Plus, FaceID-PlusV2, IDFuse) and ``ENCODER_KINDS``
``loader``           ``load_id_encoder``: read, recognise, build
``processor_order``  which UNet layer each weight of an IP-Adapter file belongs to
"""

from .checkpoint import Checkpoint, read_checkpoint
from .kinds import ENCODER_KINDS, EncoderKind, kind_named, kind_names
from .kinds.faceid_plus import is_plus_v2_name
from .kinds.idfuse import create_idfuse_encoder
from .loader import build_id_encoder, load_id_encoder
from .modules import IDEncoder

__all__ = ["ENCODER_KINDS", "Checkpoint", "EncoderKind", "IDEncoder", "build_id_encoder", "create_idfuse_encoder",
           "is_plus_v2_name", "kind_named", "kind_names", "load_id_encoder", "read_checkpoint"]
