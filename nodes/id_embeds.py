"""Several identities for Infinite-ID: pair ID embeds with masks (one picture, several people) and mix identities.

Both nodes output ID_EMBEDS, so the Guider and the Sampler take them on their existing id_embeds input
(the objects are in models/infinite_id/identities.py).
"""

from __future__ import annotations

import torch

from ..models.infinite_id.identities import MIX_MODES, add_region, mix_identities

CATEGORY = "IDFuse/Infinite-ID"

MIX_WEIGHT = {"min": 0.0, "max": 1.0, "step": 0.01}


class IDFuseCombineIDEmbeds:
    DESCRIPTION = ("Several people in one picture with Infinite-ID: pairs an identity (ID_EMBEDS) with a MASK of the "
                   "picture where that person should be. Chain one node per person through regions, then connect "
                   "the last one to id_embeds of the Infinite-ID Guider or Sampler. Each identity's ID "
                   "cross-attention acts only inside its mask (outside every mask the ID stream's cross-attention "
                   "is the prompt's alone); mixed self-attention aligns each region with its own statistics. All "
                   "identities share one ID stream, so two people cost little more than one.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ID_EMBEDS",)
    RETURN_NAMES = ("id_embeds",)
    OUTPUT_TOOLTIPS = ("The regional set: every identity so far with its mask (for the Infinite-ID Guider / Sampler, "
                       "or regions of the next Combine ID Embeds).",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "id_embeds": ("ID_EMBEDS", {"tooltip": "One identity: from IDFuse Face Embed or Mix ID Embeds."}),
                "mask": ("MASK", {"tooltip": "Where this person goes: 1 inside, 0 outside, over the whole picture "
                                             "(stretched to its size). E.g. IDFuse Region Masks (left/right halves), "
                                             "SolidMask + MaskComposite, or a painted mask."}),
            },
            "optional": {
                "regions": ("ID_EMBEDS", {"tooltip": "The set of a previous Combine ID Embeds, to add this identity "
                                                     "to. Leave empty for the first person."}),
            },
        }

    def combine(self, id_embeds, mask: torch.Tensor, regions=None):
        return (add_region(regions, id_embeds, mask),)


class IDFuseMixIDEmbeds:
    DESCRIPTION = ("Interpolates two to four identities with weights (Infinite-ID's identity mixing). Weights are "
                   "rescaled to sum to 1. mode embeddings: the weighted sum of the unit face embeddings, rescaled to "
                   "their usual length, CLIP features averaged: one new face embedding. mode tokens: each identity is "
                   "encoded by the ID encoder (in the Guider / Sampler) and the ID tokens are interpolated. A weight "
                   "of 1 with the others 0 gives that identity unchanged. The identities must come from the same "
                   "face analysis (embedding space).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ID_EMBEDS",)
    RETURN_NAMES = ("id_embeds",)
    OUTPUT_TOOLTIPS = ("The mixed identity, for the Infinite-ID Guider / Sampler or Combine ID Embeds.",)
    FUNCTION = "mix"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "id_embeds_1": ("ID_EMBEDS", {"tooltip": "First identity (IDFuse Face Embed)."}),
                "weight_1": ("FLOAT", {"default": 0.5, **MIX_WEIGHT, "tooltip": "Share of the first identity."}),
                "id_embeds_2": ("ID_EMBEDS", {"tooltip": "Second identity."}),
                "weight_2": ("FLOAT", {"default": 0.5, **MIX_WEIGHT, "tooltip": "Share of the second identity."}),
                "mode": (list(MIX_MODES), {
                    "default": "embeddings",
                    "tooltip": "embeddings: mix the normalised face embeddings (and CLIP features) into one face. "
                               "tokens: let the ID encoder encode each face and mix its ID tokens."}),
            },
            "optional": {
                "id_embeds_3": ("ID_EMBEDS", {"tooltip": "Optional third identity."}),
                "weight_3": ("FLOAT", {"default": 0.5, **MIX_WEIGHT, "tooltip": "Share of the third identity (used "
                                                                              "when id_embeds_3 is connected)."}),
                "id_embeds_4": ("ID_EMBEDS", {"tooltip": "Optional fourth identity."}),
                "weight_4": ("FLOAT", {"default": 0.5, **MIX_WEIGHT, "tooltip": "Share of the fourth identity (used "
                                                                              "when id_embeds_4 is connected)."}),
            },
        }

    def mix(self, id_embeds_1, weight_1: float, id_embeds_2, weight_2: float, mode: str, id_embeds_3=None,
            weight_3: float = 0.5, id_embeds_4=None, weight_4: float = 0.5):
        given = [("id_embeds_1", id_embeds_1, weight_1), ("id_embeds_2", id_embeds_2, weight_2),
                 ("id_embeds_3", id_embeds_3, weight_3), ("id_embeds_4", id_embeds_4, weight_4)]
        used = [(name, identity, weight) for name, identity, weight in given if identity is not None]
        names, identities, weights = (list(column) for column in zip(*used, strict=True))
        return (mix_identities(mode, identities, weights, names),)


NODE_CLASS_MAPPINGS = {
    "IDFuseCombineIDEmbeds": IDFuseCombineIDEmbeds,
    "IDFuseMixIDEmbeds": IDFuseMixIDEmbeds,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IDFuseCombineIDEmbeds": "IDFuse Combine ID Embeds",
    "IDFuseMixIDEmbeds": "IDFuse Mix ID Embeds",
}
