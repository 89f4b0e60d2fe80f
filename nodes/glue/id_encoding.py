"""Encoding a prompt that contains the identity placeholder with ComfyUI's CLIP.

ComfyUI's tokenizers give ``{encoder_key: [[(token_id, weight, ...), ...], ...]}``; its text
encoders accept a tensor in place of a token id and use it as that position's word vector.
"""

from __future__ import annotations

import torch

from ...models.errors import IDTokensError
from ...models.tokens.format import IDTokens
from ...models.tokens.patch import StageContextPatch, StageContexts, conflicting_prompts
from .model_info import TOKENIZER_KEYS, clip_family

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


def _spliced(tokens: dict, replacements: dict[str, tuple[int, object]]) -> dict:
    """A copy of ``tokens`` where, per encoder key, token id ``old`` is replaced by ``new``."""
    out = {}
    for key, chunks in tokens.items():
        old, new = replacements[key]
        out[key] = [[(new, *t[1:]) if _is_token(t, old) else t for t in chunk] for chunk in chunks]
    return out


def encode_with_identity(clip, text: str, id_tokens: IDTokens) -> tuple[torch.Tensor, torch.Tensor | None, StageContexts]:
    """The plain conditioning (initialiser word), its pooled output, and the per-stage K/V contexts."""
    tokens = clip.tokenize(text)
    family = clip_family(tokens)
    id_tokens.check_family(family)
    names = TOKENIZER_KEYS[family]
    placeholder = {k: single_token_id(clip, id_tokens.placeholder, k, "placeholder") for k in names}
    initializer = {k: single_token_id(clip, id_tokens.initializer, k, "initialiser") for k in names}
    for key in names:
        if not any(_is_token(t, placeholder[key]) for chunk in tokens[key] for t in chunk):
            raise IDTokensError(
                f"The prompt (text) does not contain the placeholder word '{id_tokens.placeholder}' of identity "
                f"tokens {id_tokens.source}. Write it where the person belongs, e.g. "
                f"'a photo of {id_tokens.placeholder} {id_tokens.initializer} in a garden'.")

    def encode(replacement: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor | None]:
        spliced = _spliced(tokens, {k: (placeholder[k], replacement[k]) for k in names})
        with torch.no_grad():  # ComfyUI runs nodes in inference mode; other callers may not
            cond, pooled = clip.encode_from_tokens(spliced, return_pooled=True)
        return cond.float().cpu(), None if pooled is None else pooled.float().cpu()

    plain, pooled = encode(initializer)
    keys, values = [], []
    for stage in range(id_tokens.num_stages):
        keys.append(encode({k: id_tokens.keys[n][stage] for k, n in names.items()})[0])
        values.append(encode({k: id_tokens.values[n][stage] for k, n in names.items()})[0])
    contexts = StageContexts(family=family, placeholder=id_tokens.placeholder, plain=plain,
                             keys=torch.cat(keys), values=torch.cat(values), source=id_tokens.source)
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
