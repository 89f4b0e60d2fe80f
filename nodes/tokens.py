"""SeFi-IDE identity tokens at inference: load a token file, encode a prompt with it, patch the model."""

from __future__ import annotations

import logging

import folder_paths

from ..models.errors import IDFuseInputError, IDTokensError
from ..models.tokens.format import IDTokens, load_id_tokens
from ..models.tokens.identity_set import IdentitySet, combine
from ..models.tokens.patch import StageContextPatch
from .glue.folders import ID_TOKENS_FOLDER
from .glue.id_encoding import (
    STAGE_CONTEXTS,
    check_distinguishable,
    encode_with_identity,
    install_token_regions,
    stage_contexts_in,
)
from .glue.model_info import STAGE_TIMESTEPS, check_model_sampling, model_family
from .glue.sampling import sigma_range

log = logging.getLogger("idfuse.nodes")

CATEGORY = "IDFuse/identity tokens"


class IDFuseLoadIDTokens:
    DESCRIPTION = ("Loads an identity-token file (SeFi-IDE per-stage K/V word vectors) from "
                   "models/idfuse/tokens. Use it with IDFuse Encode With ID.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ID_TOKENS",)
    RETURN_NAMES = ("id_tokens",)
    OUTPUT_TOOLTIPS = ("The identity: S stage pairs of key/value word vectors, its placeholder word and model family.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tokens_name": (folder_paths.get_filename_list(ID_TOKENS_FOLDER), {
                "tooltip": "A .safetensors identity-token file in models/idfuse/tokens "
                           "(or a folder listed under idfuse_tokens in extra_model_paths.yaml)."}),
        }}

    def load(self, tokens_name: str) -> tuple[IDTokens]:
        path = folder_paths.get_full_path(ID_TOKENS_FOLDER, tokens_name)
        if path is None:
            raise IDTokensError(f"tokens_name '{tokens_name}' not found in models/idfuse/tokens; "
                                f"put the file there and refresh the page.")
        tokens = load_id_tokens(path)
        log.info("Loaded identity tokens %s: %s, %d stages, placeholder '%s'",
                 tokens_name, tokens.family, tokens.num_stages, tokens.placeholder)
        return (tokens,)


class IDFuseEncodeWithID:
    DESCRIPTION = ("Encodes a prompt containing the identity's placeholder word (e.g. 'an old sks person "
                   "holding a basketball'). The CONDITIONING is the prompt with the initialiser word in the "
                   "placeholder's place and carries, per denoising stage, the prompt encoded with the stage's "
                   "key and value vectors. Connect it to the sampler's positive input AND to IDFuse Apply ID "
                   "Tokens, which makes the model use those encodings.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Positive conditioning with the identity's per-stage encodings attached.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The SD1.5 or SDXL text encoder the identity was made for."}),
            "id_tokens": ("ID_TOKENS", {"tooltip": "The identity, from IDFuse Load ID Tokens or the trainer; or "
                                                   "several, from IDFuse Combine ID Tokens."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The prompt. It must contain the identity's placeholder word (with "
                                           "several identities, each one's, e.g. 'sks and zwx shaking hands'); "
                                           "scenes, actions, attributes and styles work around it."}),
        }}

    def encode(self, clip, id_tokens: IDTokens | IdentitySet, text: str):
        if clip is None:
            raise IDFuseInputError("The clip input is None: the checkpoint has no text encoder. Connect the CLIP of an "
                                   "SD1.5 or SDXL checkpoint.")
        plain, pooled, contexts = encode_with_identity(clip, text, id_tokens)
        options = {STAGE_CONTEXTS: contexts}
        if pooled is not None:
            options["pooled_output"] = pooled
        return ([[plain, options]],)


class IDFuseCombineIDTokens:
    DESCRIPTION = ("Puts several identities into one prompt: id_tokens_a and id_tokens_b (either may itself be a "
                   "combination, so any number can be chained) become one ID_TOKENS for IDFuse Encode With ID, "
                   "whose prompt then names each placeholder ('sks and zwx shaking hands in Paris'). Each "
                   "placeholder gets its own identity's vectors. Optional masks keep an identity inside its region: "
                   "outside it, its placeholder is the plain initialiser word.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ID_TOKENS",)
    RETURN_NAMES = ("id_tokens",)
    OUTPUT_TOOLTIPS = ("The identities of a and b, in that order (with their regions), for IDFuse Encode With ID.",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "id_tokens_a": ("ID_TOKENS", {"tooltip": "An identity (IDFuse Load ID Tokens) or a combination."}),
            "id_tokens_b": ("ID_TOKENS", {"tooltip": "Another identity, with a different placeholder word, made "
                                                     "for the same model family."}),
        }, "optional": {
            "mask_a": ("MASK", {"tooltip": "Optional region of a (1 = inside; e.g. IDFuse Region Masks). For a "
                                           "combination, the region of each of its identities without one. Off "
                                           "when unconnected: the trained attention decides where it goes."}),
            "mask_b": ("MASK", {"tooltip": "Optional region of b."}),
        }}

    def combine(self, id_tokens_a, id_tokens_b, mask_a=None, mask_b=None) -> tuple[IdentitySet]:
        identities = combine([(id_tokens_a, mask_a, "id_tokens_a"), (id_tokens_b, mask_b, "id_tokens_b")])
        log.info("Combined identities %s (placeholders %s)", identities.source,
                 ", ".join(f"'{m.placeholder}'" for m in identities.members))
        return (identities,)


class IDFuseApplyIDTokens:
    DESCRIPTION = ("Makes the model's cross-attention use the identity: at each step, for the prompts made by "
                   "IDFuse Encode With ID, the keys come from the prompt encoded with the current stage's K "
                   "vector and the values from the one encoded with its V vector. Other prompts (negative, "
                   "combined, area) are untouched. The input MODEL is not changed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the identity's stage-wise keys and values.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5 or SDXL model, matching the identity's family."}),
            "conditioning": ("CONDITIONING", {
                "tooltip": "The output of IDFuse Encode With ID (also what goes to the sampler's positive input). "
                           "Combined conditionings work: every identity prompt in it is applied."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                   "tooltip": "0 = the plain prompt with the initialiser word, 1 = the identity as "
                                              "learned; in between blends the encodings. Above 1 exaggerates."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Share of the sampling at which the identity starts acting."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "Share of the sampling after which the identity stops acting."}),
        }}

    def apply(self, model, conditioning, strength: float, start_percent: float, end_percent: float):
        prompts = stage_contexts_in(conditioning)
        if not prompts:
            raise IDFuseInputError("The conditioning holds no identity prompt. Connect the output of IDFuse Encode "
                                   "With ID to the conditioning input.")
        family = model_family(model)
        check_model_sampling(model, "IDFuse Apply ID Tokens", STAGE_TIMESTEPS)
        for prompt in prompts:
            if prompt.family != family:
                raise IDTokensError(f"The identity prompt in conditioning ({prompt.source}) was encoded for "
                                    f"{prompt.family}, but the model is {family}. Use a checkpoint of the identity's "
                                    f"family.")
        check_distinguishable(model, prompts)
        sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
        sampling = model.get_model_object("model_sampling")
        patch = StageContextPatch(prompts, strength, timestep_of_sigma=sampling.timestep,
                                  sigma_start=sigma_start, sigma_end=sigma_end)
        patched = model.clone()
        patched.set_model_attn2_patch(patch)
        if any(prompt.regions is not None for prompt in prompts):
            install_token_regions(patched, family)
        return (patched,)


NODE_CLASS_MAPPINGS = {
    "IDFuseLoadIDTokens": IDFuseLoadIDTokens,
    "IDFuseEncodeWithID": IDFuseEncodeWithID,
    "IDFuseCombineIDTokens": IDFuseCombineIDTokens,
    "IDFuseApplyIDTokens": IDFuseApplyIDTokens,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IDFuseLoadIDTokens": "IDFuse Load ID Tokens",
    "IDFuseEncodeWithID": "IDFuse Encode With ID",
    "IDFuseCombineIDTokens": "IDFuse Combine ID Tokens",
    "IDFuseApplyIDTokens": "IDFuse Apply ID Tokens",
}
