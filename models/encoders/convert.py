"""An IDFuse encoder initialised from an IP-Adapter FaceID-Plus / FaceID-PlusV2 encoder, to start training from.

What is copied: the face mapper, every layer of the CLIP mapper (the perceiver resampler) and every
cross-attention layer's ID keys/values. What has no counterpart:

- **The learned CLIP queries.** FaceID-Plus feeds the face tokens to its resampler as queries; the IDFuse
  kind (Infinite-ID: ``c_id = concat(face tokens, CLIP tokens)``) has queries of its own. They start as the
  face tokens of the *mean* face embedding of ``query_faces`` (e.g. a sample of the training set), or,
  without it, of the zero embedding (the "no face" input FaceID-Plus was trained with for classifier-free
  guidance). So at step 0 the CLIP branch computes exactly what FaceID-Plus computes for that face: inputs
  the resampler was trained on, not random queries it never saw, while no single person's identity is
  baked into the queries.
- **The LoRA** of the FaceID files: Infinite-ID trains the ID stream with the UNet frozen and has no LoRA,
  so it is left out.
- **PlusV2's shortcut** (face tokens + s * CLIP tokens) becomes the concatenation, which keeps both parts.

FaceID (no CLIP mapper) is refused: the IDFuse kind needs one, and a fresh CLIP mapper beside a copied face
mapper is no better a start than training from scratch (``create_idfuse_encoder``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from ..errors import IDEncoderError
from ..faces.types import EMBEDDING_SPACES, describe_embedding_space
from ..unet import FAMILY_NAMES, block_keys
from .kinds.idfuse import IDFuse
from .modules import FaceMapper, IDEncoder, PerceiverResampler

log = logging.getLogger("idfuse.encoders")

CONVERTIBLE_KINDS = ("faceid_plus", "faceid_plusv2")


def _copy(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    module.load_state_dict({name: t.detach().clone() for name, t in weights.items()}, strict=True)
    return module.to(dtype)


def _clip_mapper(source: PerceiverResampler, queries: torch.Tensor, dtype: torch.dtype) -> PerceiverResampler:
    attention, feed_forward = source.layers[0]
    mapper = PerceiverResampler(source.proj_in.out_features, len(source.layers), attention.heads,
                                feed_forward[1].out_features, source.proj_out.out_features, source.embedding_dim,
                                num_latents=queries.shape[0])
    weights = dict(source.state_dict())
    weights["latents"] = queries.unsqueeze(0)
    return _copy(mapper, weights, dtype)


def idfuse_from_ip_adapter(encoder: IDEncoder, embedding_space: str | None = None, family: str | None = None,
                           query_faces: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> IDEncoder:
    """A new IDFuse-kind encoder holding copies of a FaceID-Plus / PlusV2 ``encoder``'s weights (see the module doc).

    embedding_space: the face embeddings it will be trained on; None = the source's (FaceID-Plus: insightface's
    arcface-w600k-512). Another space of the same width is allowed (the face mapper is fine-tuned to it) and
    logged; another width is refused. family: the model family it will be trained with, refused if the
    source's differs (None: not checked). query_faces: [N, D] face embeddings whose mean's face tokens become
    the learned CLIP queries (None: the zero embedding). dtype: of the new weights (float32 for training).
    """
    where = f"ID encoder {encoder.source} ({encoder.encoder_kind.display_name})"
    if encoder.kind not in CONVERTIBLE_KINDS:
        fix = ("it has no CLIP mapper to copy; start from an IP-Adapter FaceID-Plus or FaceID-PlusV2 file, or train "
               "from random weights (no init file)") if encoder.kind == "faceid" else \
            "only IP-Adapter FaceID-Plus / FaceID-PlusV2 files are converted"
        raise IDEncoderError(f"{where} cannot initialise an IDFuse encoder: {fix}.")
    if family is not None and family != encoder.family:
        raise IDEncoderError(f"{where} is for {FAMILY_NAMES[encoder.family]}, but the model to train is "
                             f"{FAMILY_NAMES.get(family, family)}: use an IP-Adapter FaceID-Plus file made for "
                             f"{FAMILY_NAMES.get(family, family)}.")
    embedding_space = embedding_space or encoder.embedding_space
    width = encoder.face_mapper.embedding_dim
    space = EMBEDDING_SPACES.get(embedding_space)
    if space is None:
        raise IDEncoderError(f"Unknown embedding_space {embedding_space!r}; expected one of {list(EMBEDDING_SPACES)}.")
    if space.width != width:
        raise IDEncoderError(f"{where} reads {width}-wide face embeddings of "
                             f"{describe_embedding_space(encoder.embedding_space)}; the training data holds "
                             f"{space.width}-wide ones of {describe_embedding_space(embedding_space)}. Prepare the "
                             f"data with a recogniser of {width}-wide embeddings (insightface) or train from random "
                             f"weights.")
    if embedding_space != encoder.embedding_space:
        log.warning("%s was trained on face embeddings of %s; the new encoder will be trained on %s: its face "
                    "mapper starts from vectors of another recogniser", where,
                    describe_embedding_space(encoder.embedding_space), describe_embedding_space(embedding_space))

    source_face = encoder.face_mapper
    face = FaceMapper(source_face.num_tokens, source_face.context_dim, source_face.proj[0].out_features, width)
    face = _copy(face, source_face.state_dict(), dtype)
    queries_from = "mean face of query_faces" if query_faces is not None else "zero face embedding"
    if query_faces is None:
        query_faces = torch.zeros(1, width)
    if query_faces.ndim != 2 or query_faces.shape[1] != width or query_faces.shape[0] == 0:
        raise IDEncoderError(f"query_faces must be (N, {width}) face embeddings, got {tuple(query_faces.shape)}.")
    with torch.no_grad():
        mean_face = query_faces.mean(dim=0, keepdim=True).to(source_face.proj[0].weight)
        queries = source_face(mean_face)[0].float()
    clip = _clip_mapper(encoder.clip_mapper, queries, dtype)

    hidden_sizes = {layer.key: encoder.projection(layer.key).to_k.out_features for layer in block_keys(encoder.family)}
    converted = IDEncoder(IDFuse(), encoder.family, face, clip, hidden_sizes, source=f"IDFuse from {encoder.source}",
                          embedding_space=embedding_space)
    _copy(converted.ip_projections, encoder.ip_projections.state_dict(), dtype)
    log.info("Initialised an IDFuse encoder from %s: face mapper, %d CLIP-mapper layers and the ID K/V of %d layers "
             "copied; %d learned CLIP queries from the %s; its LoRA (%d weights) left out", where, len(clip.layers),
             len(hidden_sizes), queries.shape[0], queries_from, len(encoder.lora))
    return converted.to(dtype)
