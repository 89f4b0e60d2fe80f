"""Several identities in one prompt: the set carried on the ID_TOKENS socket, and their joint stage schedule.

Each identity keeps its own placeholder word and its own number of stages. The denoising range is split at
every identity's stage boundaries (the union of their schedules); within one such *segment* every identity is
in one stage, so the prompt is encoded once per segment for the keys and once for the values, with each
placeholder spliced with its own identity's vector of that stage. A single ``IDTokens`` is a set of one, whose
segments are exactly its stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..errors import IDTokensError
from ..unet import FAMILY_NAMES, NUM_TRAIN_TIMESTEPS, stage_of_timestep
from .format import IDTokens


@dataclass(frozen=True)
class IdentitySet:
    """Identities for one prompt, in order; ``masks[i]`` is identity i's region (H, W) in [0, 1], or None."""

    members: tuple[IDTokens, ...]
    masks: tuple[torch.Tensor | None, ...]

    def __post_init__(self):
        if len(self.members) != len(self.masks):
            raise IDTokensError(f"An identity set has {len(self.members)} identities but {len(self.masks)} region "
                                f"entries; rebuild it with IDFuse Combine ID Tokens.")

    @property
    def family(self) -> str:
        return self.members[0].family

    @property
    def source(self) -> str:
        return " + ".join(m.source for m in self.members)

    @property
    def has_masks(self) -> bool:
        return any(mask is not None for mask in self.masks)


def as_identity_set(value: IDTokens | IdentitySet) -> IdentitySet:
    """What Encode With ID works on: a set, also for a single identity (a set of one, no mask)."""
    if isinstance(value, IdentitySet):
        return value
    return IdentitySet((value,), (None,))


def region_mask(mask: torch.Tensor, label: str) -> torch.Tensor:
    """A MASK input as one (H, W) float region: a batch of masks is their union."""
    if mask.ndim == 3:
        mask = mask.amax(0)
    if mask.ndim != 2 or mask.shape[0] < 1 or mask.shape[1] < 1:
        raise IDTokensError(f"{label} has shape {tuple(mask.shape)}; connect a MASK (height x width), e.g. from "
                            f"IDFuse Region Masks.")
    return mask.detach().float().clamp(0, 1).cpu()


def combine(parts: Sequence[tuple[IDTokens | IdentitySet, torch.Tensor | None, str]]) -> IdentitySet:
    """One set from (identity or set, its optional mask, the input's name) parts, in order.

    A mask given with a set applies to each of its identities that has none yet. Refuses different model
    families and two identities with the same placeholder word, naming the inputs."""
    members: list[IDTokens] = []
    masks: list[torch.Tensor | None] = []
    inputs: list[str] = []
    for value, mask, label in parts:
        group = as_identity_set(value)
        region = None if mask is None else region_mask(mask, f"The mask for {label}")
        for member, own in zip(group.members, group.masks, strict=True):
            if own is not None and region is not None:
                raise IDTokensError(f"{label} already carries a region for '{member.placeholder}' from an earlier "
                                    f"IDFuse Combine ID Tokens; connect the mask there, or disconnect this one.")
            members.append(member)
            masks.append(own if region is None else region)
            inputs.append(label)
    first = members[0]
    for member, label in zip(members[1:], inputs[1:], strict=True):
        if member.family != first.family:
            raise IDTokensError(
                f"{inputs[0]} ({first.source}) is a {FAMILY_NAMES.get(first.family, first.family)} identity but "
                f"{label} ({member.source}) is {FAMILY_NAMES.get(member.family, member.family)}; identities in one "
                f"prompt must be made for the same model family.")
    seen: dict[str, tuple[IDTokens, str]] = {}
    for member, label in zip(members, inputs, strict=True):
        if member.placeholder in seen:
            other, other_label = seen[member.placeholder]
            raise IDTokensError(
                f"{other_label} ({other.source}) and {label} ({member.source}) both use the placeholder word "
                f"'{member.placeholder}', so the prompt cannot say which is which. Train one of them with another "
                f"placeholder word (IDFuse Train Identity's placeholder).")
        seen[member.placeholder] = (member, label)
    return IdentitySet(tuple(members), tuple(masks))


def segment_stages(stage_counts: Sequence[int],
                   num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[tuple[int, ...], ...]:
    """The segments of the union of the identities' stage schedules, from the least noise up: for each, the
    stage every identity is in. Identity i's boundaries are at ``T k / S_i``; each segment's stages are read
    with ``stage_of_timestep`` at its middle, so they are the ones the patch finds inside it."""
    points = sorted({Fraction(num_train_timesteps * k, count) for count in stage_counts for k in range(count + 1)})
    segments = []
    for low, high in zip(points[:-1], points[1:], strict=True):
        middle = float((low + high) / 2)
        segments.append(tuple(int(stage_of_timestep(middle, count, num_train_timesteps)) for count in stage_counts))
    return tuple(segments)
