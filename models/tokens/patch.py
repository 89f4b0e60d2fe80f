"""Per-stage K/V contexts for the UNet's cross-attention (SeFi-IDE inference).

A prompt with the identity placeholder is encoded 1 + 2S times: once with the
initialiser word (the *plain* context, which is what the CONDITIONING carries), and per
stage once with the stage's K vector and once with its V vector spliced in. During
sampling an ``attn2_patch`` recognises the batch rows whose context is the plain one and
gives the layer the current stage's K context for its keys and V context for its values.
Rows of other prompts (the negative, other conditionings) pass through unchanged.

Rows are recognised by content only (nothing else about a conditioning reaches the patch in every
supported ComfyUI version), so two identity prompts with the same plain context but different K/V
cannot both be applied: ``conflicting_prompts`` finds such a pair for the node to refuse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..unet import stage_of_timestep


@dataclass(frozen=True)
class StageContexts:
    """One prompt encoded with the identity: plain (1, L, C), keys and values (S, L, C)."""

    family: str
    placeholder: str
    plain: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    source: str = "<memory>"

    @property
    def num_stages(self) -> int:
        return self.keys.shape[0]

    def blended(self, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V contexts moved from the plain prompt towards the identity by ``strength``."""
        if strength == 1.0:
            return self.keys, self.values
        return (torch.lerp(self.plain.expand_as(self.keys), self.keys, strength),
                torch.lerp(self.plain.expand_as(self.values), self.values, strength))


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
            same_effect = (first.num_stages == second.num_stages and _same_rows(first.keys, second.keys)
                           and _same_rows(first.values, second.values))
            if not same_effect:
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
        self._on_device: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, ...]]] = {}

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

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
        if context is None or context.ndim != 3:
            return n, context, value
        timestep = self.active_stage(extra_options["sigmas"])
        if timestep is None:
            return n, context, value
        batch, length, width = context.shape
        new_keys = new_values = None
        for prompt, (plain, keys, values) in zip(self.prompts, self._tensors(context), strict=True):
            prompt_len = plain.shape[1]
            if width != plain.shape[2] or length % prompt_len:
                continue
            # ComfyUI repeats shorter prompts up to the batch's common length (lcm).
            repeats = length // prompt_len
            rows = (context.reshape(batch, repeats, prompt_len, width) == plain.unsqueeze(1)).flatten(1).all(1)
            if not bool(rows.any()):
                continue
            stage = int(stage_of_timestep(timestep, prompt.num_stages))
            if new_keys is None:
                new_keys, new_values = context.clone(), value.clone()
            new_keys[rows] = keys[stage].repeat(repeats, 1)
            new_values[rows] = values[stage].repeat(repeats, 1)
        if new_keys is None:
            return n, context, value
        return n, new_keys, new_values
