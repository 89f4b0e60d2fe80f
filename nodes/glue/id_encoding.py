"""Encoding a prompt that contains the identity placeholder with ComfyUI's CLIP.

ComfyUI's tokenizers give ``{encoder_key: [[(token_id, weight, ...), ...], ...]}``; its text
encoders accept a tensor in place of a token id and use it as that position's word vector.
"""

from __future__ import annotations

import torch
from comfy.ldm.modules.attention import optimized_attention

from ...models.errors import IDTokensError, NoFaceError
from ...models.faces.images import rgb_photos
from ...models.faces.masks import ellipse_mask
from ...models.tokens.format import IDTokens
from ...models.tokens.identity_set import IdentitySet, as_identity_set, segment_stages
from ...models.tokens.patch import StageContextPatch, StageContexts, conflicting_prompts
from ...models.tokens.regions import TokenRegionAttention, TokenRegions
from ...models.unet import block_keys, cross_attention_path
from .model_info import TOKENIZER_KEYS, clip_family
from .training_masks import face_detector

# The conditioning option under which IDFuse Encode With ID hands its per-stage contexts to Apply ID Tokens.
STAGE_CONTEXTS = "idfuse_stage_contexts"

# Token ids that frame every CLIP prompt chunk (start, end; 0 pads clip_g).
_SPECIAL_TOKENS = {49406, 49407, 0}


def single_token_id(clip, word: str, encoder_key: str, label: str) -> int:
    pieces = [t[0] for chunk in clip.tokenize(word)[encoder_key] for t in chunk
              if isinstance(t[0], int) and t[0] not in _SPECIAL_TOKENS]
    if len(pieces) != 1:
        raise IDTokensError(
            f"The {label} word '{word}' is {len(pieces)} tokens for the text encoder, it must be exactly one. "
            f"Choose a rare single-token word such as 'sks' (placeholder) or 'person' (initialiser).")
    return pieces[0]


def _is_token(entry: tuple, token_id: int) -> bool:
    # Entries may hold embedding tensors (``embedding:name`` in the prompt) instead of ids.
    return isinstance(entry[0], int) and entry[0] == token_id


def _spliced(tokens: dict, replacements: dict[str, dict[int, object]]) -> dict:
    """A copy of ``tokens`` where, per encoder key, each token id ``old`` of ``replacements[key]`` is replaced by
    its ``new`` (one pass, so a replacement is never replaced again)."""
    out = {}
    for key, chunks in tokens.items():
        table = replacements[key]
        out[key] = [[(table[t[0]], *t[1:]) if isinstance(t[0], int) and t[0] in table else t for t in chunk]
                    for chunk in chunks]
    return out


# Masked identities whose every subset is encoded (2^M encodings per segment and K/V): beyond this it gets slow.
MAX_MASKED_IDENTITIES = 4


def encode_with_identity(clip, text: str, id_tokens: IDTokens | IdentitySet
                         ) -> tuple[torch.Tensor, torch.Tensor | None, StageContexts]:
    """The plain conditioning (initialiser words), its pooled output, and the per-segment K/V contexts.

    ``id_tokens`` is one identity or a set (IDFuse Combine ID Tokens); one identity is a set of one."""
    identities = as_identity_set(id_tokens)
    tokens = clip.tokenize(text)
    family = clip_family(tokens)
    for member in identities.members:
        member.check_family(family)
    names = TOKENIZER_KEYS[family]
    placeholders = [{k: single_token_id(clip, m.placeholder, k, "placeholder") for k in names}
                    for m in identities.members]
    initializers = [{k: single_token_id(clip, m.initializer, k, "initialiser") for k in names}
                    for m in identities.members]
    for member, placeholder in zip(identities.members, placeholders, strict=True):
        for key in names:
            if not any(_is_token(t, placeholder[key]) for chunk in tokens[key] for t in chunk):
                raise IDTokensError(
                    f"The prompt (text) does not contain the placeholder word '{member.placeholder}' of identity "
                    f"tokens {member.source}. Write it where the person belongs, e.g. "
                    f"'a photo of {member.placeholder} {member.initializer} in a garden'"
                    + ("; with several identities, each placeholder once." if len(identities.members) > 1
                       else "."))
    masked = [i for i, mask in enumerate(identities.masks) if mask is not None]
    if len(masked) > MAX_MASKED_IDENTITIES:
        raise IDTokensError(f"{len(masked)} identities have a mask; at most {MAX_MASKED_IDENTITIES} can (every "
                            f"combination of masks is encoded). Leave the masks of the others unconnected.")

    def encode(vectors: list[dict[str, object]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt with identity i's placeholder replaced by ``vectors[i]`` (a token id or a vector)."""
        replacements = {k: {p[k]: v[k] for p, v in zip(placeholders, vectors, strict=True)} for k in names}
        spliced = _spliced(tokens, replacements)
        with torch.no_grad():  # ComfyUI runs nodes in inference mode; other callers may not
            cond, pooled = clip.encode_from_tokens(spliced, return_pooled=True)
        return cond.float().cpu(), None if pooled is None else pooled.float().cpu()

    def stage_vectors(table: str, stages: tuple[int, ...], spliced: set[int]) -> list[dict[str, object]]:
        return [{k: getattr(m, table)[n][stage] for k, n in names.items()} if i in spliced else initializers[i]
                for i, (m, stage) in enumerate(zip(identities.members, stages, strict=True))]

    def encode_segments(spliced: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [encode(stage_vectors("keys", stages, spliced))[0] for stages in segments]
        values = [encode(stage_vectors("values", stages, spliced))[0] for stages in segments]
        return torch.cat(keys), torch.cat(values)

    plain, pooled = encode(initializers)
    everyone = set(range(len(identities.members)))
    segments = segment_stages([m.num_stages for m in identities.members])
    keys, values = encode_segments(everyone)
    regions = None
    if masked:
        unmasked = everyone - set(masked)
        subset_keys, subset_values = {}, {}
        for subset in range((1 << len(masked)) - 1):  # every subset but the full one (that is keys/values)
            spliced = unmasked | {i for bit, i in enumerate(masked) if subset >> bit & 1}
            if not spliced:  # nobody spliced: the plain prompt in every segment
                subset_keys[subset] = subset_values[subset] = plain.expand(len(segments), -1, -1)
            else:
                subset_keys[subset], subset_values[subset] = encode_segments(spliced)
        regions = TokenRegions(identities=tuple(masked), masks=tuple(identities.masks[i] for i in masked),
                               keys=subset_keys, values=subset_values)
    members = identities.members
    contexts = StageContexts(family=family, placeholder=members[0].placeholder, plain=plain, keys=keys,
                             values=values, source=identities.source,
                             placeholders=tuple(m.placeholder for m in members),
                             stage_counts=tuple(m.num_stages for m in members), segments=segments, regions=regions)
    return plain, pooled, contexts


def stage_contexts_in(conditioning) -> list[StageContexts]:
    found = []
    for _cond, options in conditioning:
        contexts = options.get(STAGE_CONTEXTS)
        if contexts is not None and all(contexts is not f for f in found):
            found.append(contexts)
    return found


def applied_identity_prompts(model) -> list[StageContexts]:
    """The identity prompts of the IDFuse Apply ID Tokens patches already on ``model`` (a chain of the node)."""
    patches = model.model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", [])
    return [prompt for patch in patches if isinstance(patch, StageContextPatch) for prompt in patch.prompts]


def check_distinguishable(model, prompts: list[StageContexts]) -> None:
    """Refuse identity prompts that the patch would mix up: the same plain text (placeholder replaced by the
    initialiser) with different tokens, in one conditioning or with a prompt applied earlier to this model."""
    earlier = applied_identity_prompts(model)
    pair = conflicting_prompts(earlier + prompts)
    if pair is None:
        return
    first, second = pair
    where = ("one of them is applied by an earlier IDFuse Apply ID Tokens on this model"
             if any(first is p for p in earlier) else "both are in the conditioning input")
    raise IDTokensError(
        f"Two identity prompts have the same text ({first.source} and {second.source}; {where}): with the "
        f"initialiser word in the placeholder's place they encode identically, and IDFuse Apply ID Tokens "
        f"recognises a prompt only by that encoding, so the same rows would get both identities. Change a word "
        f"outside the placeholder in one of the prompts (e.g. 'a photo of sks person' -> 'a portrait of sks "
        f"person').")


def install_token_regions(model, family: str) -> None:
    """Give every cross-attention layer of ``model`` (a clone) the token regions' attention, which reads the
    plan the context patch leaves for prompts with masks."""
    diffusion_model = model.get_model_object("diffusion_model")
    layers, downscales = {}, {}
    for key in block_keys(family):
        attn2 = model.get_model_object(f"diffusion_model.{cross_attention_path(diffusion_model, key)}")
        layers[key.key] = (attn2.to_k, attn2.to_v)
        downscales[key.key] = key.downscale
    regions = TokenRegionAttention(optimized_attention, layers, downscales)
    for key in layers:
        model.set_model_attn2_replace(regions, *key)


def layout_face_masks(layout_image: torch.Tensor, face_analysis=None) -> list[torch.Tensor]:
    """Face masks (H, W) of every face in the first picture of ``layout_image``, left to right, with the
    connected face backend's detector or the built-in one."""
    detector = face_detector(face_analysis)
    picture = rgb_photos(layout_image[:1], "layout_image")[0]
    faces = detector.detect(picture)
    if not len(faces):
        raise NoFaceError(f"No face found in layout_image by the {detector.name}. Use a layout picture with "
                          f"clear faces, connect IDFuse Load Face Analysis to face_analysis, or choose a split "
                          f"layout.")
    height, width = picture.shape[:2]
    return [ellipse_mask(height, width, tuple(float(v) for v in box)) for box in faces.boxes]
