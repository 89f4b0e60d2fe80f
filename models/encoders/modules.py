"""The ID encoder's torch modules: face mapper, perceiver resampler (the CLIP mapper), the ID keys/values
of one cross-attention layer, and ``IDEncoder``, which holds them for every cross-attention layer of a
family.

IDEncoder does what every kind shares (checking inputs, the K/V projections); what differs between
kinds (which mappers it has, how they combine into tokens, whether it can be saved) is asked of its
kind object, ``models.encoders.kinds``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IDEncoderError
from ..faces.types import EMBEDDING_SPACES, describe_embedding_space
from ..unet import CONTEXT_DIM, FAMILIES, FAMILY_NAMES, BlockKey, block_keys

if TYPE_CHECKING:
    from .kinds.base import EncoderKind

log = logging.getLogger("idfuse.encoders")

FACE_EMBEDDING_DIM = 512  # ArcFace (insightface) embedding
CLIP_HIDDEN_DIM = 1280  # OpenCLIP ViT-H/14 hidden states
DIM_HEAD = 64  # perceiver attention head width, in IP-Adapter and in our format


def _linear_out(weights: Mapping[str, torch.Tensor], key: str, where: str) -> int:
    if key not in weights or weights[key].ndim != 2:
        raise IDEncoderError(f"{where}: {key} is missing or not a matrix.")
    return weights[key].shape[0]


def load_weights(module: nn.Module, weights: Mapping[str, torch.Tensor], where: str) -> nn.Module:
    """``module`` (built on the meta device) holding exactly ``weights``; ``where`` names the file part."""
    try:
        module.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        raise IDEncoderError(f"{where}: the weights do not fit together: {' '.join(str(e).split())}") from e
    return module


class FaceMapper(nn.Module):
    """Face embedding -> T tokens: Linear, GELU, Linear to T*C, LayerNorm per token (IP-Adapter's MLPProjModel)."""

    def __init__(self, num_tokens: int, context_dim: int, hidden_dim: int = 1024,
                 embedding_dim: int = FACE_EMBEDDING_DIM):
        super().__init__()
        self.num_tokens, self.context_dim = num_tokens, context_dim
        self.proj = nn.Sequential(nn.Linear(embedding_dim, hidden_dim), nn.GELU(),
                                  nn.Linear(hidden_dim, num_tokens * context_dim))
        self.norm = nn.LayerNorm(context_dim)

    @classmethod
    def from_weights(cls, weights: Mapping[str, torch.Tensor], context_dim: int, where: str) -> FaceMapper:
        """The mapper these weights (``proj.0.*``, ``proj.2.*``, ``norm.*``) make, its sizes read from their shapes."""
        hidden = _linear_out(weights, "proj.0.weight", where)
        out = _linear_out(weights, "proj.2.weight", where)
        if out % context_dim:
            raise IDEncoderError(f"{where}: proj.2 makes {out} values, not a whole number of {context_dim}-wide "
                                 f"tokens.")
        with torch.device("meta"):
            mapper = cls(out // context_dim, context_dim, hidden, weights["proj.0.weight"].shape[1])
        return load_weights(mapper, weights, where)

    @property
    def embedding_dim(self) -> int:
        return self.proj[0].in_features

    def forward(self, face_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(face_embeds).reshape(-1, self.num_tokens, self.context_dim)
        return self.norm(tokens)


class PerceiverAttention(nn.Module):
    """Latents attend to [inputs; latents] (Flamingo's perceiver layer as IP-Adapter uses it)."""

    def __init__(self, dim: int, heads: int, dim_head: int = DIM_HEAD):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)  # inputs
        self.norm2 = nn.LayerNorm(dim)  # latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(latents)), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


def _feed_forward(dim: int, inner: int) -> nn.Sequential:
    # Indices 0, 1, 3 are the checkpoint's key names (layers.i.1.0 / .1.1 / .1.3).
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverResampler(nn.Module):
    """CLIP hidden states -> tokens. Queries are given (FaceID-Plus: the face tokens) or learned (``latents``)."""

    def __init__(self, dim: int, depth: int, heads: int, ff_dim: int, output_dim: int,
                 embedding_dim: int = CLIP_HIDDEN_DIM, num_latents: int = 0):
        super().__init__()
        if num_latents:
            self.latents = nn.Parameter(torch.randn(1, num_latents, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads), _feed_forward(dim, ff_dim)]) for _ in range(depth))
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    @classmethod
    def from_weights(cls, weights: Mapping[str, torch.Tensor], context_dim: int, where: str) -> PerceiverResampler:
        """The resampler these weights make (learned queries when they hold ``latents``); it must make
        ``context_dim``-wide tokens."""
        dim = _linear_out(weights, "proj_in.weight", where)
        inner = _linear_out(weights, "layers.0.0.to_q.weight", where)
        if inner % DIM_HEAD:
            raise IDEncoderError(f"{where}: attention width {inner} is not a multiple of the {DIM_HEAD}-wide heads.")
        depth = len({k.split(".")[1] for k in weights if k.startswith("layers.")})
        latents = weights.get("latents")
        with torch.device("meta"):
            resampler = cls(dim, depth, inner // DIM_HEAD, _linear_out(weights, "layers.0.1.1.weight", where),
                            _linear_out(weights, "proj_out.weight", where), weights["proj_in.weight"].shape[1],
                            num_latents=0 if latents is None else latents.shape[1])
        resampler = load_weights(resampler, weights, where)
        if resampler.norm_out.normalized_shape[0] != context_dim:
            raise IDEncoderError(f"{where}: makes {resampler.norm_out.normalized_shape[0]}-wide tokens, expected "
                                 f"{context_dim}.")
        return resampler

    @property
    def num_latents(self) -> int:
        return self.latents.shape[1] if hasattr(self, "latents") else 0

    @property
    def embedding_dim(self) -> int:
        return self.proj_in.in_features

    def forward(self, x: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        if latents is None:
            latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attention, feed_forward in self.layers:
            latents = latents + attention(x, latents)
            latents = latents + feed_forward(latents)
        return self.norm_out(self.proj_out(latents))


class IDKeyValue(nn.Module):
    """One cross-attention layer's projections of the ID tokens."""

    def __init__(self, context_dim: int, hidden_size: int):
        super().__init__()
        self.to_k = nn.Linear(context_dim, hidden_size, bias=False)
        self.to_v = nn.Linear(context_dim, hidden_size, bias=False)


def _module_name(key: tuple) -> str:
    # nn.ModuleDict names cannot contain dots, so "input.1.0" is stored as "input_1_0".
    block, block_id, index = key[:3]
    return f"{block}_{block_id}_{index}"


class IDEncoder(nn.Module):
    """Face (+ CLIP) mappers and the ID K/V projections of every cross-attention layer of a family.

    ``kind`` is the kind's name ("faceid", "idfuse", ...), ``encoder_kind`` the kind object that
    encodes and saves. ``lora`` maps ComfyUI UNet weight names (``diffusion_model.….attn2.to_q.weight``)
    to ``{"down": (r, in), "up": (out, r)}``: weight += up @ down (scale 1, no alpha), as IP-Adapter
    FaceID applies it. Empty for kinds without a LoRA. ``embedding_space`` is the face embedding space it
    was trained on (``models.faces.types.EMBEDDING_SPACES``); None = its kind's.
    """

    def __init__(self, kind: EncoderKind | str, family: str, face_mapper: FaceMapper,
                 clip_mapper: PerceiverResampler | None, hidden_sizes: Mapping[tuple, int],
                 lora: dict[str, dict[str, torch.Tensor]] | None = None, source: str = "<memory>",
                 embedding_space: str | None = None):
        super().__init__()
        if isinstance(kind, str):
            from .kinds import kind_named  # here: the kinds import this module

            kind = kind_named(kind)
        where = f"ID encoder {source} ({kind.display_name})"
        if family not in FAMILIES:
            raise IDEncoderError(f"{where}: unknown model family {family!r}; expected one of {sorted(FAMILIES)}.")
        kind.check_mappers(face_mapper, clip_mapper, where)
        embedding_space = embedding_space or kind.embedding_space
        known = EMBEDDING_SPACES.get(embedding_space)
        if known is not None and known.width != face_mapper.embedding_dim:
            raise IDEncoderError(f"{where}: its face mapper takes {face_mapper.embedding_dim}-wide embeddings, but "
                                 f"it says it was trained on {describe_embedding_space(embedding_space)}, whose "
                                 f"vectors are {known.width} wide; the file is damaged or mislabelled.")
        if face_mapper.context_dim != CONTEXT_DIM[family]:
            raise IDEncoderError(f"{where}: the face mapper makes {face_mapper.context_dim}-wide tokens; "
                                 f"{FAMILY_NAMES[family]} needs {CONTEXT_DIM[family]}.")
        layers = {k.key for k in block_keys(family)}
        given = {tuple(k[:3]) for k in hidden_sizes}
        if given != layers:
            raise IDEncoderError(f"{where}: ID cross-attention must cover the {len(layers)} cross-attention layers "
                                 f"of {FAMILY_NAMES[family]}; missing {sorted(layers - given)[:4]}, "
                                 f"unknown {sorted(given - layers)[:4]}.")
        self.encoder_kind = kind
        self.kind, self.family, self.source = kind.name, family, source
        self.embedding_space = embedding_space
        self.face_mapper = face_mapper
        self.clip_mapper = clip_mapper
        self.ip_projections = nn.ModuleDict(
            {_module_name(k): IDKeyValue(face_mapper.context_dim, size) for k, size in hidden_sizes.items()})
        self.lora: dict[str, dict[str, torch.Tensor]] = lora or {}

    @classmethod
    def from_weights(cls, kind: EncoderKind, family: str, face_mapper: FaceMapper,
                     clip_mapper: PerceiverResampler | None,
                     ip: Mapping[BlockKey, tuple[torch.Tensor, torch.Tensor]],
                     lora: dict[str, dict[str, torch.Tensor]], source: str,
                     embedding_space: str | None = None) -> IDEncoder:
        """An encoder around loaded mappers, taking each layer's (to_k, to_v) weights as they are (no initialisation)."""
        with torch.device("meta"):
            encoder = cls(kind, family, face_mapper, clip_mapper, {k: to_k.shape[0] for k, (to_k, _) in ip.items()},
                          lora, source, embedding_space)
        weights = {}
        for layer, (to_k, to_v) in ip.items():
            weights[f"{_module_name(layer)}.to_k.weight"] = to_k
            weights[f"{_module_name(layer)}.to_v.weight"] = to_v
        load_weights(encoder.ip_projections, weights, f"{source}: ID cross-attention")
        return encoder

    @property
    def context_dim(self) -> int:
        return self.face_mapper.context_dim

    @property
    def num_tokens(self) -> int:
        learned = self.clip_mapper.num_latents if self.clip_mapper is not None else 0
        return self.face_mapper.num_tokens + learned

    @property
    def needs_clip_vision(self) -> bool:
        return self.encoder_kind.needs_clip_vision

    def check_face_embedding(self, embedding_space: str | None, width: int, made_by: str = "") -> None:
        """Raise unless face embeddings of ``embedding_space`` and ``width`` (from the backend ``made_by``) are what
        this encoder was trained on; only log a warning when a space is not one IDFuse knows (a face model
        loaded by another pack), as it cannot be checked."""
        where = f"ID encoder {self.source} ({self.encoder_kind.display_name})"
        by = f" made by {made_by}" if made_by else ""
        given = describe_embedding_space(embedding_space) if embedding_space else "an unnamed embedding space"
        expected = describe_embedding_space(self.embedding_space)
        space = EMBEDDING_SPACES.get(self.embedding_space)
        fix = space.how_to_load if space else f"Use the face model of the {self.embedding_space} space"
        fix += " and run IDFuse Face Embed again"
        if width != self.face_mapper.embedding_dim:
            raise IDEncoderError(f"{where} takes {self.face_mapper.embedding_dim}-wide face embeddings of {expected}, "
                                 f"but id_embeds holds {width}-wide ones of {given}{by}. {fix}.")
        if embedding_space == self.embedding_space:
            return
        if embedding_space not in EMBEDDING_SPACES or space is None:
            log.warning("%s was trained on face embeddings of %s; id_embeds%s are of %s, which IDFuse cannot check: "
                        "if they are not the same recogniser's, the identity will not come through", where, expected,
                        by, given)
            return
        raise IDEncoderError(f"{where} was trained on face embeddings of {expected}, but id_embeds holds {given}"
                             f"{by}: another recogniser's vectors, which this encoder cannot read. {fix}, or use an "
                             f"ID encoder trained on {embedding_space}.")

    def encode(self, face_embeds: torch.Tensor, clip_hidden: torch.Tensor | None = None,
               shortcut_scale: float = 1.0) -> torch.Tensor:
        """ID tokens (B, T, C) of B faces.

        face_embeds: (B, 512) ArcFace embeddings. clip_hidden: (B, 257, 1280) CLIP vision
        ``hidden_states[-2]`` of the aligned face crops, for kinds with a CLIP mapper.
        shortcut_scale: FaceID-PlusV2's weight of the CLIP branch (ignored by other kinds).
        """
        weight = self.face_mapper.proj[0].weight
        if face_embeds.ndim != 2 or face_embeds.shape[1] != self.face_mapper.embedding_dim:
            raise IDEncoderError(f"ID encoder {self.source}: face embeddings must be (batch, "
                                 f"{self.face_mapper.embedding_dim}), got {tuple(face_embeds.shape)}.")
        face_embeds = face_embeds.to(weight.device, weight.dtype)
        if self.needs_clip_vision:
            if clip_hidden is None:
                raise IDEncoderError(f"ID encoder {self.source} ({self.encoder_kind.display_name}) needs CLIP vision "
                                     f"hidden states of the face: connect a CLIP vision model (ViT-H/14).")
            expected = (face_embeds.shape[0], self.clip_mapper.embedding_dim)
            if clip_hidden.ndim != 3 or (clip_hidden.shape[0], clip_hidden.shape[2]) != expected:
                raise IDEncoderError(f"ID encoder {self.source}: CLIP hidden states must be ({expected[0]}, tokens, "
                                     f"{expected[1]}) (ViT-H/14 penultimate layer), got {tuple(clip_hidden.shape)}.")
            clip_hidden = clip_hidden.to(weight.device, weight.dtype)
        else:
            clip_hidden = None
        return self.encoder_kind.encode(self, face_embeds, clip_hidden, shortcut_scale=shortcut_scale)

    def projection(self, key: tuple) -> IDKeyValue:
        """The ID K/V projections of the cross-attention layer ``(block, block_id, index)`` (or a BlockKey)."""
        name = _module_name(key)
        if name not in self.ip_projections:
            raise IDEncoderError(f"ID encoder {self.source} ({FAMILY_NAMES[self.family]}) has no ID cross-attention "
                                 f"for layer {tuple(key[:3])}.")
        return self.ip_projections[name]

    def kv(self, key: tuple, id_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the ID tokens for the cross-attention layer ``(block, block_id, index)``."""
        projection = self.projection(key)
        return projection.to_k(id_tokens), projection.to_v(id_tokens)

    def check_layer_widths(self, widths: Mapping[tuple, int]) -> None:
        """Raise, naming this encoder's file, unless its ID keys/values have the channel width of each layer
        in ``widths`` (``(block, block_id, index)`` or BlockKey -> the model's cross-attention width)."""
        wrong = [f"{'.'.join(map(str, key[:3]))}: {self.projection(key).to_k.out_features} != {width}"
                 for key, width in widths.items() if self.projection(key).to_k.out_features != width]
        if wrong:
            raise IDEncoderError(
                f"ID encoder {self.source} ({self.encoder_kind.display_name}, {FAMILY_NAMES[self.family]}): its ID "
                f"keys/values do not fit this model's cross-attention widths ({', '.join(wrong[:3])}"
                f"{', ...' if len(wrong) > 3 else ''}); use an encoder made for this model.")

    # ------------------------------------------------------------------------------ saving (by kind)

    def metadata(self, training: dict | None = None) -> dict[str, str]:
        return self.encoder_kind.metadata(self, training)

    def save(self, path: str | os.PathLike, training: dict | None = None) -> Path:
        """Write the encoder in its kind's format, atomically; kinds read from other projects' files refuse."""
        return self.encoder_kind.save(self, path, training)
