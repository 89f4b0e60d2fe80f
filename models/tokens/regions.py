"""Token regions: an identity acts only inside its mask.

With masks, Encode With ID also encodes the prompt, per segment, for every subset of the masked identities
(the others' placeholders get their initialiser word; identities without a mask are always spliced). In a
cross-attention layer each query position is inside some subset of the masks (a grid cell counts as inside
when more than half of it is, ``masks_on_grid``); its output is the attention over that subset's encoding. So
outside every mask the output is exactly the plain prompt's, bit for bit: the same contexts go through the
same projections and the same attention function as without the patch.

This needs keys per query position, which ComfyUI's ``attn2_patch`` cannot give. The context patch
(``StageContextPatch``) still picks the rows and the segment, and leaves a *plan* in the block's
``extra_options`` (the one dict ComfyUI hands to both patches of a block); ``TokenRegionAttention``, the
``attn2_replace`` of every cross-attention layer, runs one attention per subset present and picks each
position's output. Without masks none of this is installed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..unet import layer_grid, masks_on_grid

# The key under which the context patch hands the region plan of a block to TokenRegionAttention.
REGION_PLAN = "idfuse_token_regions"

Attention = Callable[..., torch.Tensor]  # ComfyUI's optimized_attention(q, k, v, heads, ...)


@dataclass(frozen=True)
class TokenRegions:
    """The masked identities of one prompt and the prompt's encodings for each subset of them.

    ``identities[j]`` is the index (in the prompt's identity set) of the identity with mask ``masks[j]``. A
    subset is a bit mask over j; ``keys[subset]`` and ``values[subset]`` (G, L, C) are the prompt encoded per
    segment with just those masked identities spliced. The full subset is the prompt's main encoding and is
    not stored here.
    """

    identities: tuple[int, ...]
    masks: tuple[torch.Tensor, ...]
    keys: Mapping[int, torch.Tensor]
    values: Mapping[int, torch.Tensor]
    _grids: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def full(self) -> int:
        return (1 << len(self.masks)) - 1

    def subsets_on_grid(self, grid: tuple[int, int]) -> torch.Tensor:
        """(h*w,) the subset of masks each cell of a layer's grid is inside (more than half of it)."""
        cells = self._grids.get(grid)
        if cells is None:
            cells = torch.zeros(grid[0] * grid[1], dtype=torch.long)
            for bit, mask in enumerate(self.masks):
                cells |= (masks_on_grid(mask.unsqueeze(0), grid)[0] > 0.5).long() << bit
            self._grids[grid] = cells
        return cells

    def same_as(self, other: TokenRegions | None) -> bool:
        if other is None:
            return False
        return (self.identities == other.identities and len(self.masks) == len(other.masks)
                and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(self.masks, other.masks, strict=True))
                and self.keys.keys() == other.keys.keys()
                and all(torch.equal(self.keys[s], other.keys[s]) and torch.equal(self.values[s], other.values[s])
                        for s in self.keys))


@dataclass
class RegionRows:
    """One identity prompt's rows in a block's batch, and its per-subset contexts at the current segment."""

    rows: torch.Tensor  # (B,) bool
    regions: TokenRegions
    contexts: dict[int, tuple[torch.Tensor, torch.Tensor]]  # subset -> (keys (L, C), values (L, C)), repeated


@dataclass
class RegionPlan:
    """What the context patch decided for a block: its final key/value contexts and the rows with regions."""

    keys: torch.Tensor
    values: torch.Tensor
    entries: list[RegionRows]


class TokenRegionAttention:
    """ComfyUI ``attn2_replace`` for the token regions: ``(q, k, v, extra_options) -> out``.

    ``layers`` maps a block key to the layer's ``(to_k, to_v)`` projections (the same modules ComfyUI uses,
    so per-subset keys are computed exactly as the layer computes its own), ``downscales`` to its grid factor.
    """

    def __init__(self, attention: Attention, layers: Mapping[tuple[str, int, int], tuple[nn.Module, nn.Module]],
                 downscales: Mapping[tuple[str, int, int], int]):
        self.attention = attention
        self.layers = dict(layers)
        self.downscales = dict(downscales)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads, precision = extra_options["n_heads"], extra_options.get("attn_precision")
        out = self.attention(q, k, v, heads, attn_precision=precision)
        plan: RegionPlan | None = extra_options.pop(REGION_PLAN, None)
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        if plan is None or key not in self.layers:
            return out
        grid = layer_grid(extra_options["original_shape"][-2:], self.downscales[key])
        if grid[0] * grid[1] != q.shape[1]:
            return out  # not an image grid this pack knows: leave the trained attention alone
        to_k, to_v = self.layers[key]
        for entry in plan.entries:
            cells = entry.regions.subsets_on_grid(grid).to(q.device)
            for subset, (subset_keys, subset_values) in entry.contexts.items():
                inside = cells == subset
                if not bool(inside.any()):
                    continue
                # The whole batch, as the layer itself would see it: same shapes, so the same kernels and bits.
                keys_context, values_context = plan.keys.clone(), plan.values.clone()
                keys_context[entry.rows] = subset_keys
                values_context[entry.rows] = subset_values
                subset_out = self.attention(q, to_k(keys_context), to_v(values_context), heads,
                                            attn_precision=precision)
                chosen = entry.rows.view(-1, 1, 1) & inside.view(1, -1, 1)
                out = torch.where(chosen, subset_out, out)
        return out


# Simple layouts of IDFuse Region Masks: name -> (rows, columns) of equal cells, numbered row by row.
SPLIT_LAYOUTS: dict[str, tuple[int, int]] = {
    "left | right": (1, 2),
    "top | bottom": (2, 1),
    "left | middle | right": (1, 3),
    "2 x 2 grid": (2, 2),
}


def split_regions(layout: str, height: int, width: int) -> list[torch.Tensor]:
    """The cells of a split layout as (H, W) masks (1 inside), left to right, then top to bottom."""
    rows, columns = SPLIT_LAYOUTS[layout]
    ys = torch.arange(height).view(-1, 1) * rows // height
    xs = torch.arange(width).view(1, -1) * columns // width
    return [((ys == r) & (xs == c)).float() for r in range(rows) for c in range(columns)]
