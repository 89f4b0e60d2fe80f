"""What the ID_EMBEDS socket can carry besides one face: a mix of identities and a regional set.

- ``FaceEmbedding`` (``models.faces.types``): one identity, acting everywhere (IDFuse Face Embed).
- ``TokenMix``: identities whose ID tokens are interpolated (IDFuse Mix ID Embeds, mode ``tokens``). The
  ID encoder runs in the Guider / Sampler, so the mix travels as its recipe: the faces and their weights.
- ``RegionalIdentities``: identities each with a mask of the picture (IDFuse Combine ID Embeds). One ID
  stream carries all of them; each identity's ID cross-attention acts inside its own mask.

``mix_embeddings`` is the ``embeddings`` mode of the Mix node: it returns a plain ``FaceEmbedding``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..errors import IDFuseInputError
from ..faces.types import FaceEmbedding, describe_embedding_space


@dataclass(frozen=True)
class TokenMix:
    """Identities whose ID tokens are mixed: tokens = sum_i weight_i * encoder(face_i); weights sum to 1."""

    faces: tuple[FaceEmbedding, ...]
    weights: tuple[float, ...]

    @property
    def embedding_space(self) -> str:
        return self.faces[0].embedding_space


Identity = FaceEmbedding | TokenMix


@dataclass(frozen=True)
class IdentityRegion:
    identity: Identity
    mask: torch.Tensor  # (H, W) in [0, 1]: where in the picture the identity acts (stretched to the picture)


@dataclass(frozen=True)
class RegionalIdentities:
    """Several identities in one picture, each in its own region (in the order they were combined)."""

    regions: tuple[IdentityRegion, ...]

    @property
    def masks(self) -> torch.Tensor:
        """(N, H, W): every region's mask, resized to the first one's size when they differ."""
        size = self.regions[0].mask.shape
        return torch.stack([region.mask if region.mask.shape == size else
                            torch.nn.functional.interpolate(region.mask[None, None], size=size, mode="bilinear",
                                                            align_corners=False)[0, 0]
                            for region in self.regions])


def identity_space(identity: object) -> str | None:
    """The embedding space of an identity, None when it does not name one (ID_EMBEDS made by other code)."""
    return getattr(identity, "embedding_space", None)


def check_same_space(identities: Sequence[object], names: Sequence[str]) -> None:
    """Raise, naming both inputs and both spaces, unless every identity that names its space names the same one."""
    first = next(((n, identity_space(i)) for n, i in zip(names, identities, strict=True) if identity_space(i)), None)
    if first is None:
        return
    for name, identity in zip(names, identities, strict=True):
        space = identity_space(identity)
        if space and space != first[1]:
            raise IDFuseInputError(
                f"{first[0]} holds {describe_embedding_space(first[1])} embeddings but {name} holds "
                f"{describe_embedding_space(space)} ones: identities of two embedding spaces cannot be used "
                f"together. Embed every face with the same face analysis (IDFuse Load Face Analysis model).")


def normalised_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """Weights rescaled to sum to 1; negative weights or a zero sum are refused."""
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise IDFuseInputError(f"Mix weights {list(weights)}: every weight must be >= 0 and at least one > 0; set "
                               f"the weight of each identity to use.")
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    return sum((w * t.float() for w, t in zip(weights, tensors, strict=True)), torch.zeros_like(tensors[0], dtype=torch.float32))


def mix_embeddings(faces: Sequence[FaceEmbedding], weights: Sequence[float]) -> FaceEmbedding:
    """One identity between ``faces``: the weighted sum of their unit face embeddings, rescaled to the weighted
    mean of their norms (the space's typical norm: 1 for Face Embed's normalized mean), and the weighted mean of
    their CLIP features (None unless every face has them). A single non-zero weight returns that face as it is."""
    used = [(face, w) for face, w in zip(faces, normalised_weights(weights), strict=True) if w > 0]
    if len(used) == 1:
        return used[0][0]
    faces, weights = [face for face, _ in used], [w for _, w in used]
    norms = [face.arcface.float().norm(dim=-1, keepdim=True) for face in faces]
    mixed = _weighted_sum([face.arcface.float() / norm for face, norm in zip(faces, norms, strict=True)], weights)
    arcface = mixed / mixed.norm(dim=-1, keepdim=True) * _weighted_sum(norms, weights)

    def mean_of(attribute: str) -> torch.Tensor | None:
        values = [getattr(face, attribute, None) for face in faces]
        return None if any(v is None for v in values) else _weighted_sum(values, weights)

    return replace(faces[0], arcface=arcface, clip_hidden=mean_of("clip_hidden"),
                   clip_hidden_uncond=mean_of("clip_hidden_uncond"),
                   per_photo_arcface=torch.cat([face.per_photo_arcface for face in faces]),
                   boxes=torch.cat([face.boxes for face in faces]),
                   keypoints=torch.cat([face.keypoints for face in faces]),
                   sources=tuple(s for face in faces for s in face.sources),
                   combine=f"mix of {len(faces)} identities (weights {', '.join(f'{w:.3g}' for w in weights)})")


def mix_tokens(faces: Sequence[FaceEmbedding], weights: Sequence[float]) -> Identity:
    """The ``tokens`` mode: the recipe for the encoder; a single non-zero weight returns that face as it is."""
    used = [(face, w) for face, w in zip(faces, normalised_weights(weights), strict=True) if w > 0]
    if len(used) == 1:
        return used[0][0]
    return TokenMix(tuple(face for face, _ in used), tuple(w for _, w in used))


MIX_MODES = {"embeddings": mix_embeddings, "tokens": mix_tokens}


def mix_identities(mode: str, identities: Sequence[object], weights: Sequence[float],
                   names: Sequence[str]) -> Identity:
    """IDFuse Mix ID Embeds: check the inputs (kinds, one embedding space) and mix them by ``mode``. In tokens
    mode an input that is itself a token mix joins with its own weights scaled by the one it gets here."""
    if mode not in MIX_MODES:
        raise IDFuseInputError(f"mode {mode!r} is not one of {', '.join(MIX_MODES)}; pick one of those.")
    faces: list[FaceEmbedding] = []
    face_weights: list[float] = []
    for name, identity, weight in zip(names, identities, normalised_weights(weights), strict=True):
        if isinstance(identity, RegionalIdentities):
            raise IDFuseInputError(f"{name} is a regional set (IDFuse Combine ID Embeds); mix the identities "
                                   f"first, then combine the mix with a mask.")
        if isinstance(identity, TokenMix):
            if mode != "tokens":
                raise IDFuseInputError(f"{name} is a token mix (IDFuse Mix ID Embeds, mode tokens), which has no "
                                       f"single face embedding; set mode to tokens, or mix Face Embed outputs.")
            faces.extend(identity.faces)
            face_weights.extend(weight * w for w in identity.weights)
        else:
            faces.append(identity)
            face_weights.append(weight)
    check_same_space(identities, names)
    return MIX_MODES[mode](faces, face_weights)


def add_region(regions: object | None, identity: object, mask: torch.Tensor) -> RegionalIdentities:
    """IDFuse Combine ID Embeds: ``regions`` (a previous set, or None) with ``identity`` acting inside ``mask``."""
    if isinstance(identity, RegionalIdentities):
        raise IDFuseInputError("id_embeds is already a regional set (IDFuse Combine ID Embeds); connect it to "
                               "regions instead, and a single identity (Face Embed or Mix ID Embeds) to id_embeds.")
    if regions is not None and not isinstance(regions, RegionalIdentities):
        raise IDFuseInputError(f"regions is a {type(regions).__name__}, not a regional set: connect the output of "
                               f"another IDFuse Combine ID Embeds, or leave it empty for the first identity.")
    mask = torch.as_tensor(mask).float()
    if mask.ndim == 3:
        if mask.shape[0] != 1:
            raise IDFuseInputError(f"mask holds {mask.shape[0]} masks; give one mask per identity (one Combine ID "
                                   f"Embeds node per identity, chained through regions).")
        mask = mask[0]
    if mask.ndim != 2 or not mask.numel():
        raise IDFuseInputError(f"mask must be a ComfyUI MASK (height, width), got shape {tuple(mask.shape)}.")
    if not bool((mask > 0).any()):
        raise IDFuseInputError("mask is empty (zero everywhere): the identity would act nowhere. Connect a mask "
                               "that is 1 where this person should be (e.g. IDFuse Region Masks, or SolidMask).")
    previous = regions.regions if regions is not None else ()
    identities = [r.identity for r in previous] + [identity]
    names = [f"identity {i + 1} of regions" for i in range(len(previous))] + ["id_embeds"]
    check_same_space(identities, names)
    return RegionalIdentities((*previous, IdentityRegion(identity, mask.clamp(0.0, 1.0).cpu())))
