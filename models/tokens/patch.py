"""Per-stage K/V contexts for the UNet's cross-attention (SeFi-IDE inference).

A prompt with the identity placeholder is encoded 1 + 2S times: once with the
initialiser word (the *plain* context, which is what the CONDITIONING carries), and per
stage once with the stage's K vector and once with its V vector spliced in. During
sampling an ``attn2_patch`` recognises the batch rows whose context is the plain one and
gives the layer the current stage's K context for its keys and V context for its values.
Rows of other prompts (the negative, other conditionings) pass through unchanged.

A prompt with several identities (``identity_set.py``) is encoded once per *segment* of their joint stage
schedule instead of once per stage; ``segment_at`` finds the segment of a timestep. With token regions
(``regions.py``) the patch also leaves a plan for the regions' attention.

Rows are recognised by content only (nothing else about a conditioning reaches the patch in every
supported ComfyUI version), so two identity prompts with the same plain context but different K/V
cannot both be applied: ``conflicting_prompts`` finds such a pair for the node to refuse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..unet import stage_of_timestep
from .regions import REGION_PLAN, RegionPlan, RegionRows, TokenRegions


@dataclass(frozen=True)
class StageContexts:
    """One prompt encoded with its identities: plain (1, L, C), keys and values (G, L, C), one per segment.

    ``placeholders`` and ``stage_counts`` name each identity and its number of stages, ``segments[g]`` the stage
    of each identity in segment g. Left empty they describe a single identity whose segments are its G stages.
    ``regions``: the per-mask encodings when identities have masks, else None.
    """

    family: str
    placeholder: str
    plain: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    source: str = "<memory>"
    placeholders: tuple[str, ...] = ()
    stage_counts: tuple[int, ...] = ()
    segments: tuple[tuple[int, ...], ...] = ()
    regions: TokenRegions | None = None

    def __post_init__(self):
        if not self.placeholders:
            object.__setattr__(self, "placeholders", (self.placeholder,))
        if not self.stage_counts:
            object.__setattr__(self, "stage_counts", (self.keys.shape[0],))
        if not self.segments:
            object.__setattr__(self, "segments", tuple((stage,) for stage in range(self.keys.shape[0])))
        object.__setattr__(self, "_segment_index", {stages: g for g, stages in enumerate(self.segments)})

    @property
    def num_stages(self) -> int:
        """The number of distinct encodings (segments; a single identity's stages)."""
        return self.keys.shape[0]

    def segment_at(self, timestep: torch.Tensor | float) -> int:
        """The segment holding ``timestep``: where every identity is in its own ``stage_of_timestep``."""
        stages = tuple(int(stage_of_timestep(timestep, count)) for count in self.stage_counts)
        found = self._segment_index.get(stages)
        if found is None:  # a timestep on two rounding-different boundaries: the nearest segment's stages
            found = min(range(len(self.segments)),
                        key=lambda g: sum(abs(a - b) for a, b in zip(self.segments[g], stages, strict=True)))
        return found

    def _towards(self, target: torch.Tensor, strength: float) -> torch.Tensor:
        return target if strength == 1.0 else torch.lerp(self.plain.expand_as(target), target, strength)

    def blended(self, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V contexts moved from the plain prompt towards the identity by ``strength``."""
        return self._towards(self.keys, strength), self._towards(self.values, strength)

    def blended_regions(self, strength: float) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The same for each region subset's encodings (empty without regions)."""
        if self.regions is None:
            return {}
        return {subset: (self._towards(self.regions.keys[subset], strength),
                         self._towards(self.regions.values[subset], strength)) for subset in self.regions.keys}

    def same_effect(self, other: StageContexts) -> bool:
        """Whether the patch would do the same to this prompt's rows as to ``other``'s."""
        same_regions = (self.regions is None and other.regions is None) or (
            self.regions is not None and self.regions.same_as(other.regions))
        return (self.num_stages == other.num_stages and self.stage_counts == other.stage_counts
                and self.segments == other.segments and _same_rows(self.keys, other.keys)
                and _same_rows(self.values, other.values) and same_regions)


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (..., L, C) are equal once the shorter is repeated to the longer's length, as
    ComfyUI repeats a batch's prompts up to their common length."""
    short, long = sorted((a, b), key=lambda t: t.shape[-2])
    if short.shape[:-2] != long.shape[:-2] or short.shape[-1] != long.shape[-1] or long.shape[-2] % short.shape[-2]:
        return False
    return torch.equal(torch.cat([short] * (long.shape[-2] // short.shape[-2]), dim=-2), long)


def conflicting_prompts(prompts: Sequence[StageContexts]) -> tuple[StageContexts, StageContexts] | None:
    """A pair of prompts whose rows the patch cannot tell apart (same plain context) but which would give
    different keys or values, or None. Equal prompts (the same text with the same tokens) do not conflict."""
    for i, first in enumerate(prompts):
        for second in prompts[i + 1:]:
            if first is second or not _same_rows(first.plain, second.plain):
                continue
            if not first.same_effect(second):
                return first, second
    return None


class StageContextPatch:
    """ComfyUI ``attn2_patch``: ``(n, context, value, extra_options) -> (n, keys_ctx, values_ctx)``.

    Immutable once built, so clones of a patched model share it instead of deep-copying
    its tensors (``ModelPatcher.clone`` deep-copies ``model_options``).
    """

    def __init__(self, prompts: Sequence[StageContexts], strength: float,
                 timestep_of_sigma: Callable[[torch.Tensor], torch.Tensor],
                 sigma_start: float = float("inf"), sigma_end: float = 0.0):
        self.prompts = tuple(prompts)
        self.strength = float(strength)
        self.timestep_of_sigma = timestep_of_sigma
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        self._blended = [(p.plain, *p.blended(self.strength)) for p in self.prompts]
        self._blended_regions = [p.blended_regions(self.strength) for p in self.prompts]
        self._on_device: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, ...]]] = {}
        self._regions_on_device: dict[tuple[torch.device, torch.dtype], list[dict]] = {}

    def __deepcopy__(self, memo):
        return self

    def active_stage(self, sigmas: torch.Tensor) -> torch.Tensor | None:
        """The timestep of this step, or None when the patch is off at this sigma."""
        if self.strength == 0.0:
            return None
        sigma = sigmas.reshape(-1)[:1]
        value = float(sigma.item())
        if not (self.sigma_end <= value <= self.sigma_start):
            return None
        return self.timestep_of_sigma(sigma)

    def _tensors(self, like: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        key = (like.device, like.dtype)
        cached = self._on_device.get(key)
        if cached is None:
            cached = [tuple(t.to(device=like.device, dtype=like.dtype) for t in group) for group in self._blended]
            self._on_device[key] = cached
        return cached

    def _region_tensors(self, like: torch.Tensor, index: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        key = (like.device, like.dtype)
        cached = self._regions_on_device.get(key)
        if cached is None:
            cached = [{subset: tuple(t.to(device=like.device, dtype=like.dtype) for t in pair)
                       for subset, pair in regions.items()} for regions in self._blended_regions]
            self._regions_on_device[key] = cached
        return cached[index]

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
        if context is None or context.ndim != 3:
            return n, context, value
        timestep = self.active_stage(extra_options["sigmas"])
        if timestep is None:
            return n, context, value
        batch, length, width = context.shape
        new_keys = new_values = None
        region_rows: list[RegionRows] = []
        for index, (prompt, (plain, keys, values)) in enumerate(zip(self.prompts, self._tensors(context), strict=True)):
            prompt_len = plain.shape[1]
            if width != plain.shape[2] or length % prompt_len:
                continue
            # ComfyUI repeats shorter prompts up to the batch's common length (lcm).
            repeats = length // prompt_len
            rows = (context.reshape(batch, repeats, prompt_len, width) == plain.unsqueeze(1)).flatten(1).all(1)
            if not bool(rows.any()):
                continue
            segment = prompt.segment_at(timestep)
            if new_keys is None:
                new_keys, new_values = context.clone(), value.clone()
            new_keys[rows] = keys[segment].repeat(repeats, 1)
            new_values[rows] = values[segment].repeat(repeats, 1)
            if prompt.regions is not None:
                contexts = {subset: (k[segment].repeat(repeats, 1), v[segment].repeat(repeats, 1))
                            for subset, (k, v) in self._region_tensors(context, index).items()}
                region_rows.append(RegionRows(rows, prompt.regions, contexts))
        if new_keys is None:
            return n, context, value
        if region_rows:
            # A later IDFuse patch in the chain starts from these contexts, so its plan holds the final ones.
            earlier = extra_options.get(REGION_PLAN)
            entries = (earlier.entries if earlier is not None else []) + region_rows
            extra_options[REGION_PLAN] = RegionPlan(new_keys, new_values, entries)
        elif REGION_PLAN in extra_options:
            extra_options[REGION_PLAN] = RegionPlan(new_keys, new_values, extra_options[REGION_PLAN].entries)
        return n, new_keys, new_values
