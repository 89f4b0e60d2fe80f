"""Attention probes: the placeholder's cross-attention, computed explicitly on chosen layers. Plain torch.

Fast attention kernels never return probabilities, so on the layers the attention loss reads an
``attn2_replace`` probe computes softmax(Q Kᵀ/√d) itself (mean over heads) and the layer output
from those probabilities; every other layer keeps ComfyUI's own attention. The probes follow
ComfyUI's replace-patch signature ``f(q, k, v, extra_options) -> out`` but import nothing from it.
What the losses make of the records is in ``losses/`` (the method: docs/METHOD.md §1.7).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import TrainingError
from ..unet import BlockKey, layer_grid, masks_on_grid


def explicit_attention(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q Kᵀ/√d) per head, in float32: (batch, heads, queries, keys)."""
    batch, queries, inner = q.shape
    dim_head = inner // heads
    qh = q.float().view(batch, queries, heads, dim_head).transpose(1, 2)
    kh = k.float().view(k.shape[0], k.shape[1], heads, dim_head).transpose(1, 2)
    return (qh @ kh.transpose(-1, -2) * dim_head ** -0.5).softmax(-1)


def _column(probs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean over heads of one token's column per batch row: (batch, queries)."""
    mean = probs.mean(1)
    rows = torch.arange(mean.shape[0], device=mean.device)
    return mean[rows, :, positions.to(mean.device)]


@dataclass
class ProbeBatch:
    """What the probes need to know about the batch going through the UNet."""

    placeholder_positions: torch.Tensor  # (B,) index of the placeholder token in each row's context
    reference_context: torch.Tensor | None = None  # (B, L, C) the reference prompt's encoding
    reference_positions: torch.Tensor | None = None  # (B,) index of the initialiser in it


@dataclass
class LayerRecord:
    key: BlockKey
    grid: tuple[int, int]
    target: torch.Tensor  # (B, h*w) the placeholder's attention
    reference: torch.Tensor | None  # (B, h*w) the initialiser's attention in the reference prompt


class AttentionProbes:
    """Shared state of the probes of one model clone: the current batch and what the layers saw.

    ``attention`` is the host's fast attention ``f(q, k, v, heads) -> out`` used when no batch is
    set. While a batch is set every probe layer computes its probabilities explicitly (also while a
    gradient-checkpointed block is recomputed), but records only while ``collecting``.
    """

    def __init__(self, to_k: dict[BlockKey, nn.Module], attention: Callable[..., torch.Tensor],
                 detach_reference: bool = True):
        self.to_k = to_k
        self.attention = attention
        self.detach_reference = detach_reference
        self.batch: ProbeBatch | None = None
        self.collecting = False
        self.records: list[LayerRecord] = []

    @property
    def keys(self) -> tuple[BlockKey, ...]:
        return tuple(self.to_k)

    def replace_patch(self, key: BlockKey) -> LayerProbe:
        return LayerProbe(self, key)

    def begin(self, batch: ProbeBatch) -> None:
        self.batch, self.collecting, self.records = batch, True, []

    def collected(self) -> list[LayerRecord]:
        """Stop collecting (the batch stays set for the backward pass) and return the records."""
        self.collecting = False
        records, self.records = self.records, []
        return records

    def end(self) -> None:
        self.batch, self.collecting, self.records = None, False, []


class LayerProbe:
    """``attn2_replace`` for one layer. Shared, never copied: ComfyUI deep-copies model_options on clone."""

    def __init__(self, probes: AttentionProbes, key: BlockKey):
        self.probes = probes
        self.key = key

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        probes = self.probes
        heads = extra_options["n_heads"]
        batch = probes.batch
        if batch is None:
            return probes.attention(q, k, v, heads)
        probs = explicit_attention(q, k, heads)
        b, n, inner = q.shape
        vh = v.view(v.shape[0], v.shape[1], heads, inner // heads).transpose(1, 2)
        out = (probs.to(v.dtype) @ vh).transpose(1, 2).reshape(b, n, inner)
        # The same operations with and without collecting: a gradient-checkpointed block is
        # recomputed in the backward pass and must save the same tensors as the first time.
        reference = None
        if batch.reference_context is not None:
            to_k = probes.to_k[self.key]
            reference_keys = to_k(batch.reference_context.to(device=k.device, dtype=k.dtype))
            reference = _column(explicit_attention(q, reference_keys, heads), batch.reference_positions)
            if probes.detach_reference:
                reference = reference.detach()
        grid = layer_grid(extra_options["original_shape"][-2:], self.key.downscale)
        if grid[0] * grid[1] != n:
            raise TrainingError(f"Cross-attention layer {self.key} has {n} tokens, expected a {grid[0]}x{grid[1]} "
                                f"grid: the block table does not fit this model. Train on a plain SD1.5 or SDXL "
                                f"checkpoint.")
        target = _column(probs, batch.placeholder_positions)
        if probes.collecting:
            probes.records.append(LayerRecord(self.key, grid, target, reference))
        return out


def face_share(records: Sequence[LayerRecord], masks: torch.Tensor) -> torch.Tensor:
    """(B,) share of the placeholder's attention that falls inside the face, averaged over layers."""
    shares = []
    for record in records:
        face = masks_on_grid(masks, record.grid).to(record.target.device)
        attention = record.target.detach().float()
        shares.append((attention * face).sum(1) / attention.sum(1).clamp_min(1e-12))
    return torch.stack(shares).mean(0)


def attention_maps(records: Sequence[LayerRecord], size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) the placeholder's attention, each layer resized to ``size`` and averaged."""
    maps = []
    for record in records:
        grid_map = record.target.detach().float().view(-1, 1, *record.grid)
        maps.append(F.interpolate(grid_map, size=size, mode="bilinear", align_corners=False)[:, 0])
    return torch.stack(maps).mean(0)
