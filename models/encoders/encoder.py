"""The ID encoder of Infinite-ID: face mapper, CLIP mapper and per-layer ID cross-attention K/V.

An encoder turns a face-recognition embedding (ArcFace, 512) and, for some kinds, CLIP vision
hidden states (OpenCLIP ViT-H/14 ``hidden_states[-2]``, 257 x 1280) into ID tokens (T, C),
C = the UNet's context width; each cross-attention layer projects them with its own
to_k / to_v (no bias). Kinds:

``faceid``         IP-Adapter FaceID: tokens = face mapper (MLP 512 -> 1024 -> T*C, LayerNorm(C)).
``faceid_plus``    IP-Adapter FaceID-Plus: the face tokens are the queries of a perceiver
                   resampler over the CLIP hidden states; its output are the tokens.
``faceid_plusv2``  FaceID-PlusV2: face tokens + shortcut_scale * resampler output.
``idfuse``         ours, Infinite-ID style: c_id = concat(face-mapper tokens, CLIP-mapper tokens),
                   the CLIP mapper being a resampler with its own learned queries.

IP-Adapter FaceID checkpoints also carry a LoRA of every UNet attention (rank 128 in the
released files); it is kept in ``IDEncoder.lora`` under ComfyUI's UNet weight names.

Our file (``idfuse``): safetensors, metadata ``format`` = "idfuse.id_encoder", ``format_version``,
``model_family``, ``num_face_tokens``, ``num_clip_tokens``, ``training`` (JSON); tensors
``face_mapper.*``, ``clip_mapper.*`` (perceiver heads of 64 channels) and
``ip.<block key>.to_k.weight`` / ``.to_v.weight`` for every cross-attention layer of the family.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import IDEncoderError
from ..files import atomic_save_safetensors
from ..unet import (
    CONTEXT_DIM,
    FAMILIES,
    FAMILY_NAMES,
    BlockKey,
    UnsupportedModelError,
    block_keys,
    family_from_context_dim,
)

FORMAT_NAME = "idfuse.id_encoder"
FORMAT_VERSION = 1
KINDS = ("faceid", "faceid_plus", "faceid_plusv2", "idfuse")
KIND_NAMES = {"faceid": "IP-Adapter FaceID", "faceid_plus": "IP-Adapter FaceID-Plus",
              "faceid_plusv2": "IP-Adapter FaceID-PlusV2", "idfuse": "IDFuse"}

FACE_EMBEDDING_DIM = 512  # ArcFace (insightface) embedding
CLIP_HIDDEN_DIM = 1280  # OpenCLIP ViT-H/14 hidden states
DIM_HEAD = 64  # perceiver attention head width, in IP-Adapter and in our format

SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}
TORCH_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}

# What the two kinds of file look like, for errors on files that are neither.
EXPECTED_FACEID = ("an IP-Adapter FaceID / FaceID-Plus / FaceID-PlusV2 checkpoint (keys image_proj.proj.0.weight, "
                   "image_proj.norm.weight, [image_proj.perceiver_resampler.*], ip_adapter.1.to_k_ip.weight, "
                   "ip_adapter.0.to_q_lora.down.weight ...)")
EXPECTED_IDFUSE = f"an IDFuse encoder (safetensors with metadata format={FORMAT_NAME!r})"
EXPECTED = f"{EXPECTED_FACEID} or {EXPECTED_IDFUSE}"


# ---------------------------------------------------------------------------------------- modules


class FaceMapper(nn.Module):
    """Face embedding -> T tokens: Linear, GELU, Linear to T*C, LayerNorm per token (IP-Adapter's MLPProjModel)."""

    def __init__(self, num_tokens: int, context_dim: int, hidden_dim: int = 1024,
                 embedding_dim: int = FACE_EMBEDDING_DIM):
        super().__init__()
        self.num_tokens, self.context_dim = num_tokens, context_dim
        self.proj = nn.Sequential(nn.Linear(embedding_dim, hidden_dim), nn.GELU(),
                                  nn.Linear(hidden_dim, num_tokens * context_dim))
        self.norm = nn.LayerNorm(context_dim)

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

    ``lora`` maps ComfyUI UNet weight names (``diffusion_model.….attn2.to_q.weight``) to
    ``{"down": (r, in), "up": (out, r)}``: weight += up @ down (scale 1, no alpha), as IP-Adapter
    FaceID applies it. Empty for kinds without a LoRA.
    """

    def __init__(self, kind: str, family: str, face_mapper: FaceMapper, clip_mapper: PerceiverResampler | None,
                 hidden_sizes: Mapping[tuple, int], lora: dict[str, dict[str, torch.Tensor]] | None = None,
                 source: str = "<memory>"):
        super().__init__()
        if kind not in KINDS:
            raise IDEncoderError(f"Unknown ID encoder kind {kind!r}; expected one of {KINDS}.")
        if family not in FAMILIES:
            raise IDEncoderError(f"Unknown model family {family!r}; expected one of {sorted(FAMILIES)}.")
        if (clip_mapper is None) != (kind == "faceid"):
            raise IDEncoderError(f"A {KIND_NAMES[kind]} encoder {'needs' if kind != 'faceid' else 'has no'} CLIP mapper.")
        if clip_mapper is not None and (clip_mapper.num_latents > 0) != (kind == "idfuse"):
            raise IDEncoderError("Only IDFuse encoders have learned CLIP-mapper queries; FaceID-Plus queries are "
                                 "the face tokens.")
        if face_mapper.context_dim != CONTEXT_DIM[family]:
            raise IDEncoderError(f"The face mapper makes {face_mapper.context_dim}-wide tokens; "
                                 f"{FAMILY_NAMES[family]} needs {CONTEXT_DIM[family]}.")
        layers = {k.key for k in block_keys(family)}
        given = {tuple(k[:3]) for k in hidden_sizes}
        if given != layers:
            raise IDEncoderError(f"ID cross-attention must cover the {len(layers)} cross-attention layers of "
                                 f"{FAMILY_NAMES[family]}; missing {sorted(layers - given)[:4]}, "
                                 f"unknown {sorted(given - layers)[:4]}.")
        self.kind, self.family, self.source = kind, family, source
        self.face_mapper = face_mapper
        self.clip_mapper = clip_mapper
        self.ip_projections = nn.ModuleDict(
            {_module_name(k): IDKeyValue(face_mapper.context_dim, size) for k, size in hidden_sizes.items()})
        self.lora: dict[str, dict[str, torch.Tensor]] = lora or {}

    @property
    def context_dim(self) -> int:
        return self.face_mapper.context_dim

    @property
    def num_tokens(self) -> int:
        learned = self.clip_mapper.num_latents if self.clip_mapper is not None else 0
        return self.face_mapper.num_tokens + learned

    @property
    def needs_clip_vision(self) -> bool:
        return self.clip_mapper is not None

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
        face_tokens = self.face_mapper(face_embeds.to(weight.device, weight.dtype))
        if self.clip_mapper is None:
            return face_tokens
        if clip_hidden is None:
            raise IDEncoderError(f"ID encoder {self.source} ({KIND_NAMES[self.kind]}) needs CLIP vision hidden "
                                 f"states of the face: connect a CLIP vision model (ViT-H/14).")
        expected = (face_embeds.shape[0], self.clip_mapper.embedding_dim)
        if clip_hidden.ndim != 3 or (clip_hidden.shape[0], clip_hidden.shape[2]) != expected:
            raise IDEncoderError(f"ID encoder {self.source}: CLIP hidden states must be ({expected[0]}, tokens, "
                                 f"{expected[1]}) (ViT-H/14 penultimate layer), got {tuple(clip_hidden.shape)}.")
        clip_hidden = clip_hidden.to(weight.device, weight.dtype)
        if self.kind == "idfuse":
            return torch.cat([face_tokens, self.clip_mapper(clip_hidden)], dim=1)
        out = self.clip_mapper(clip_hidden, latents=face_tokens)
        if self.kind == "faceid_plusv2":
            out = face_tokens + shortcut_scale * out
        return out

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

    # ------------------------------------------------------------------------------ our format

    def metadata(self, training: dict | None = None) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "model_family": self.family,
            "num_face_tokens": str(self.face_mapper.num_tokens),
            "num_clip_tokens": str(self.clip_mapper.num_latents),
            "training": json.dumps(training or {}, sort_keys=True),
        }

    def save(self, path: str | os.PathLike, training: dict | None = None) -> Path:
        """Write an ``idfuse`` encoder atomically. IP-Adapter encoders stay in their own files."""
        if self.kind != "idfuse":
            raise IDEncoderError(f"Only IDFuse encoders are saved in the IDFuse format; {self.source} is "
                                 f"{KIND_NAMES[self.kind]}: keep using its original file.")
        tensors = {f"face_mapper.{n}": t for n, t in self.face_mapper.state_dict().items()}
        tensors.update({f"clip_mapper.{n}": t for n, t in self.clip_mapper.state_dict().items()})
        for layer in block_keys(self.family):
            projection = self.projection(layer)
            tensors[f"ip.{layer}.to_k.weight"] = projection.to_k.weight
            tensors[f"ip.{layer}.to_v.weight"] = projection.to_v.weight
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        return atomic_save_safetensors(tensors, path, self.metadata(training))


def create_idfuse_encoder(family: str, hidden_sizes: Mapping[tuple, int], num_face_tokens: int = 4,
                          num_clip_tokens: int = 16, face_hidden_dim: int = 1024, clip_mapper_dim: int | None = None,
                          clip_mapper_depth: int = 4, ff_mult: int = 4) -> IDEncoder:
    """A freshly initialised IDFuse encoder to train.

    hidden_sizes: channel width of each cross-attention layer of the family (BlockKey or key tuple).
    clip_mapper_dim: the CLIP mapper's working width (heads of 64); None = the context width.
    """
    context = CONTEXT_DIM[family]
    dim = clip_mapper_dim or context
    if dim % DIM_HEAD:
        raise IDEncoderError(f"clip_mapper_dim must be a multiple of {DIM_HEAD}, got {dim}.")
    face = FaceMapper(num_face_tokens, context, face_hidden_dim)
    clip = PerceiverResampler(dim, clip_mapper_depth, dim // DIM_HEAD, ff_mult * dim, context,
                              num_latents=num_clip_tokens)
    return IDEncoder("idfuse", family, face, clip, hidden_sizes)


# ------------------------------------------------------------------------------------- reading


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
            raise IDEncoderError(f"{name}: entry {full!r} is of type {type(value).__name__}, not a tensor; expected "
                                 f"{EXPECTED}.")
    return flat


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Tensors of a .safetensors file, or of a .bin/.pt read with ``torch.load(weights_only=True)`` only."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return Checkpoint(path.name, load_file(str(path)), metadata)
        except (SafetensorError, OSError, ValueError) as e:
            raise IDEncoderError(f"{path.name}: not a readable safetensors file ({e}).") from e
    if suffix in TORCH_SUFFIXES:
        try:
            # weights_only: tensors and plain containers only; never run a pickle's code.
            tree = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise IDEncoderError(
                f"{path.name}: refused to load: it contains Python objects other than tensors, and IDFuse reads "
                f".bin files with torch.load(weights_only=True) only. Use a .safetensors version of the file, "
                f"or convert it with a tool you trust. ({str(e).splitlines()[0]})") from e
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise IDEncoderError(f"{path.name}: not a readable PyTorch checkpoint ({e}).") from e
        if not isinstance(tree, Mapping):
            raise IDEncoderError(f"{path.name}: holds a {type(tree).__name__}, expected a dict of tensors: {EXPECTED}.")
        return Checkpoint(path.name, _flatten(tree, path.name))
    raise IDEncoderError(f"{path.name}: unsupported file type {suffix!r}; ID encoders are "
                         f"{sorted(SAFETENSORS_SUFFIXES | TORCH_SUFFIXES)} files.")


def _linear_out(weights: Mapping[str, torch.Tensor], key: str, where: str) -> int:
    if key not in weights or weights[key].ndim != 2:
        raise IDEncoderError(f"{where}: {key} is missing or not a matrix.")
    return weights[key].shape[0]


def _loaded(module: nn.Module, weights: Mapping[str, torch.Tensor], where: str) -> nn.Module:
    try:
        module.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        raise IDEncoderError(f"{where}: the weights do not fit together: {' '.join(str(e).split())}") from e
    return module


def _face_mapper_from(weights: Mapping[str, torch.Tensor], context_dim: int, where: str) -> FaceMapper:
    hidden = _linear_out(weights, "proj.0.weight", where)
    out = _linear_out(weights, "proj.2.weight", where)
    if out % context_dim:
        raise IDEncoderError(f"{where}: proj.2 makes {out} values, not a whole number of {context_dim}-wide tokens.")
    with torch.device("meta"):
        mapper = FaceMapper(out // context_dim, context_dim, hidden, weights["proj.0.weight"].shape[1])
    return _loaded(mapper, weights, where)


def _resampler_from(weights: Mapping[str, torch.Tensor], context_dim: int, where: str) -> PerceiverResampler:
    dim = _linear_out(weights, "proj_in.weight", where)
    inner = _linear_out(weights, "layers.0.0.to_q.weight", where)
    if inner % DIM_HEAD:
        raise IDEncoderError(f"{where}: attention width {inner} is not a multiple of the {DIM_HEAD}-wide heads.")
    depth = len({k.split(".")[1] for k in weights if k.startswith("layers.")})
    latents = weights.get("latents")
    with torch.device("meta"):
        resampler = PerceiverResampler(
            dim, depth, inner // DIM_HEAD, _linear_out(weights, "layers.0.1.1.weight", where),
            _linear_out(weights, "proj_out.weight", where), weights["proj_in.weight"].shape[1],
            num_latents=0 if latents is None else latents.shape[1])
    resampler = _loaded(resampler, weights, where)
    if resampler.norm_out.normalized_shape[0] != context_dim:
        raise IDEncoderError(f"{where}: makes {resampler.norm_out.normalized_shape[0]}-wide tokens, expected "
                             f"{context_dim}.")
    return resampler


def _context_width(ckpt: Checkpoint, key: str) -> tuple[str, int]:
    width = ckpt.tensors[key].shape[1] if ckpt.tensors[key].ndim == 2 else None
    try:
        return family_from_context_dim(width), width
    except UnsupportedModelError as e:
        raise IDEncoderError(f"{ckpt.name}: {key} takes a {width}-wide context; IDFuse supports SD1.5 (768) and "
                             f"SDXL (2048) encoders.") from e


# --- IP-Adapter


def _is_ip_adapter(ckpt: Checkpoint) -> bool:
    return any(k.startswith(("image_proj.", "ip_adapter.")) for k in ckpt.tensors)


def _ip_adapter_image_proj_kind(ckpt: Checkpoint) -> str:
    """faceid / faceid_plus, or an IDEncoderError naming the non-FaceID IP-Adapter it is."""
    keys = set(ckpt.keys_under("image_proj."))
    proj_in = ckpt.tensors.get("image_proj.proj.0.weight")
    if "perceiver_resampler.proj_in.weight" in keys:
        return "faceid_plus"
    if {"proj.0.weight", "proj.2.weight", "norm.weight"} <= keys and "proj.3.weight" not in keys \
            and proj_in is not None and proj_in.shape[-1] == FACE_EMBEDDING_DIM:
        return "faceid"
    image_kinds = (("latents", "IP-Adapter Plus / Plus-Face (resampler of CLIP image features)"),
                   ("proj.3.weight", "IP-Adapter Full-Face (MLP of CLIP image features)"),
                   ("proj.weight", "IP-Adapter (CLIP image embedding)"))
    for key, description in image_kinds:
        if key in keys:
            raise IDEncoderError(
                f"{ckpt.name} is an {description}, not a FaceID checkpoint: it encodes images, not face-"
                f"recognition embeddings. Use IP-Adapter FaceID, FaceID-Plus or FaceID-PlusV2 (e.g. "
                f"ip-adapter-faceid-plusv2_sd15.bin) or an IDFuse encoder.")
    raise IDEncoderError(f"{ckpt.name}: has IP-Adapter parts but an unknown image_proj "
                         f"({sorted(keys)[:5]}); expected {EXPECTED}.")


def is_plus_v2_name(name: str) -> bool:
    """Whether a file name says FaceID-PlusV2 ("plusv2", "plus_v2", "plus-v2", any case)."""
    return "plusv2" in re.sub(r"[-_ .]", "", name.lower())


# IP-Adapter's LoRA modules of a processor and the attention weight of ComfyUI's UNet each one changes.
LORA_TARGETS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


def _ip_adapter_lora(ckpt: Checkpoint, order: tuple, hidden: Mapping[BlockKey, int],
                     context: int) -> dict[str, dict[str, torch.Tensor]]:
    """The LoRA of every processor under ComfyUI weight names; {} for files without one (e.g. FaceID-Portrait)."""
    from .processor_order import CROSS_ATTENTION, comfy_attention_weight

    if not any("_lora." in k for k in ckpt.keys_under("ip_adapter.")):
        return {}
    lora = {}
    for p in order:
        for module, projection in LORA_TARGETS.items():
            prefix = f"ip_adapter.{p.number}.{module}."
            down, up = ckpt.take(prefix + "down.weight"), ckpt.take(prefix + "up.weight")
            reads_context = p.attention == CROSS_ATTENTION and projection in ("to_k", "to_v")
            width_in = context if reads_context else hidden[p.layer]
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] \
                    or (up.shape[0], down.shape[1]) != (hidden[p.layer], width_in):
                raise IDEncoderError(
                    f"{ckpt.name}: LoRA {prefix}down/up have shapes {tuple(down.shape)} / {tuple(up.shape)}; "
                    f"expected (rank, {width_in}) / ({hidden[p.layer]}, rank) for layer {p.layer}.")
            lora[comfy_attention_weight(p.layer, p.attention, projection)] = {"down": down, "up": up}
    return lora


def _assemble(kind: str, family: str, face: FaceMapper, clip: PerceiverResampler | None,
              ip: Mapping[BlockKey, tuple[torch.Tensor, torch.Tensor]], lora: dict, name: str) -> IDEncoder:
    """An IDEncoder around loaded mappers, taking the ID K/V weights as they are (no initialisation)."""
    with torch.device("meta"):
        encoder = IDEncoder(kind, family, face, clip, {k: to_k.shape[0] for k, (to_k, _) in ip.items()}, lora, name)
    weights = {}
    for layer, (to_k, to_v) in ip.items():
        weights[f"{_module_name(layer)}.to_k.weight"] = to_k
        weights[f"{_module_name(layer)}.to_v.weight"] = to_v
    _loaded(encoder.ip_projections, weights, f"{name}: ID cross-attention")
    return encoder


def _build_ip_adapter(ckpt: Checkpoint, plus_v2: bool | None) -> IDEncoder:
    from .processor_order import cross_attention_processors, processors

    kind = _ip_adapter_image_proj_kind(ckpt)
    found = sorted(int(m[1]) for k in ckpt.keys_under("ip_adapter.") if (m := re.fullmatch(r"(\d+)\.to_k_ip\.weight", k)))
    if not found:
        raise IDEncoderError(f"{ckpt.name}: no ip_adapter.N.to_k_ip.weight tensors; expected {EXPECTED}.")
    family, context = _context_width(ckpt, f"ip_adapter.{found[0]}.to_k_ip.weight")
    cross = cross_attention_processors(family)
    if found != [p.number for p in cross]:
        raise IDEncoderError(
            f"{ckpt.name}: has to_k_ip for {len(found)} processors ({found[:4]}...), but an {FAMILY_NAMES[family]} "
            f"IP-Adapter has them for its {len(cross)} cross-attention processors ({[p.number for p in cross][:4]}"
            f"...); the file is incomplete or for another UNet.")
    if kind == "faceid_plus" and (is_plus_v2_name(ckpt.name) if plus_v2 is None else plus_v2):
        kind = "faceid_plusv2"
    where = f"{ckpt.name} ({KIND_NAMES[kind]}, {FAMILY_NAMES[family]})"

    clip_weights = ckpt.take_prefix("image_proj.perceiver_resampler.")
    clip = _resampler_from(clip_weights, context, f"{where} perceiver_resampler") if clip_weights else None
    face_weights = {k: v for k, v in ckpt.take_prefix("image_proj.").items() if not k.startswith("perceiver_resampler.")}
    face = _face_mapper_from(face_weights, context, f"{where} image_proj")
    if clip is not None and clip.proj_in.out_features != context:
        raise IDEncoderError(f"{where}: the resampler is {clip.proj_in.out_features} wide; its queries are the "
                             f"{context}-wide face tokens.")
    ip = {p.layer: (ckpt.take(f"ip_adapter.{p.number}.to_k_ip.weight"),
                    ckpt.take(f"ip_adapter.{p.number}.to_v_ip.weight")) for p in cross}
    hidden = {layer: to_k.shape[0] for layer, (to_k, _) in ip.items()}
    lora = _ip_adapter_lora(ckpt, processors(family), hidden, context)
    return _assemble(kind, family, face, clip, ip, lora, ckpt.name)


# --- ours


def _build_idfuse(ckpt: Checkpoint) -> IDEncoder:
    meta, where = ckpt.metadata, f"ID encoder {ckpt.name}"
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
    face = _face_mapper_from(ckpt.take_prefix("face_mapper."), context, f"{where} face_mapper")
    clip = _resampler_from(ckpt.take_prefix("clip_mapper."), context, f"{where} clip_mapper")
    for key, actual in (("num_face_tokens", face.num_tokens), ("num_clip_tokens", clip.num_latents)):
        if meta.get(key) != str(actual):
            raise IDEncoderError(f"{where}: metadata {key}={meta.get(key)!r} but the weights make {actual} tokens.")
    ip = {layer: (ckpt.take(f"ip.{layer}.to_k.weight"), ckpt.take(f"ip.{layer}.to_v.weight"))
          for layer in block_keys(family)}
    return _assemble("idfuse", family, face, clip, ip, {}, ckpt.name)


def build_id_encoder(ckpt: Checkpoint, plus_v2: bool | None = None, dtype: torch.dtype = torch.float32) -> IDEncoder:
    """Recognise the checkpoint's kind and build its encoder (weights and LoRA in ``dtype``).

    Every tensor of the file must be used; ``ckpt.used`` records which were.
    """
    if ckpt.metadata.get("format") == FORMAT_NAME:
        encoder = _build_idfuse(ckpt)
    elif _is_ip_adapter(ckpt):
        encoder = _build_ip_adapter(ckpt, plus_v2)
    else:
        found = f"metadata format={ckpt.metadata['format']!r}, " if "format" in ckpt.metadata else ""
        raise IDEncoderError(f"{ckpt.name} is neither {EXPECTED_FACEID} nor {EXPECTED_IDFUSE}. Found {found}keys "
                             f"{sorted(ckpt.tensors)[:4]}...")
    unused = ckpt.unused()
    if unused:
        raise IDEncoderError(f"{ckpt.name}: has tensors that {KIND_NAMES[encoder.kind]} checkpoints do not have: "
                             f"{unused[:4]} ({len(unused)} in all); the file is not what it looks like.")
    encoder.lora = {name: {part: t.to(dtype) for part, t in pair.items()} for name, pair in encoder.lora.items()}
    return encoder.to(dtype)


def load_id_encoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    plus_v2: bool | None = None) -> IDEncoder:
    """Load an ID encoder from an IDFuse file or an IP-Adapter FaceID / FaceID-Plus / FaceID-PlusV2 checkpoint.

    The kind and family come from the keys and shapes: image_proj.perceiver_resampler.* makes a
    FaceID-Plus, the to_k_ip input width the family (768: SD1.5, 2048: SDXL). FaceID-Plus and
    FaceID-PlusV2 files have identical keys and shapes (only inference differs: V2 adds the face
    tokens as a shortcut), so, as in ComfyUI_IPAdapter_plus, V2 is told by the file name
    containing "plusv2" (also "plus_v2", "plus-v2"); ``plus_v2`` overrides the name.
    ``.bin`` files are read with ``torch.load(weights_only=True)`` only.
    """
    return build_id_encoder(read_checkpoint(path), plus_v2, dtype)
