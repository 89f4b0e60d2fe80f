"""Two identity prompts with the same text: the patch finds a prompt's rows by its plain encoding, so two
prompts that encode identically but carry different identities are refused (one conditioning, or chained
IDFuse Apply ID Tokens nodes), with what to change; equal or distinguishable prompts still work."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from factories import make_clip, make_id_tokens, make_model, random_stage_contexts, sample

from comfyui_idfuse.models.errors import IDTokensError
from comfyui_idfuse.models.tokens.patch import StageContexts, conflicting_prompts
from comfyui_idfuse.nodes.tokens import STAGE_CONTEXTS, IDFuseApplyIDTokens, IDFuseEncodeWithID

apply_tokens = IDFuseApplyIDTokens().apply
encode = IDFuseEncodeWithID().encode


@pytest.fixture(scope="module")
def sd15():
    return make_model("sd15")


@pytest.fixture(scope="module")
def clip(tokenizer_dir):
    return make_clip("sd15", tokenizer_dir)


def two_people(seed_a: int = 1, seed_b: int = 2):
    return (dataclasses.replace(make_id_tokens(num_stages=2, seed=seed_a), source="anna.safetensors"),
            dataclasses.replace(make_id_tokens(num_stages=2, seed=seed_b), source="bert.safetensors"))


def in_areas(*conditionings):
    """The conditionings side by side in two areas, as ConditioningSetArea + Conditioning (Combine) make them."""
    combined = []
    for index, conditioning in enumerate(conditionings):
        for cond, options in conditioning:
            combined.append([cond, {**options, "area": (16, 8, 0, 8 * index), "strength": 1.0,
                                    "set_area_to_bounds": False}])
    return combined


def test_same_text_two_identities_in_one_conditioning_is_refused(sd15, clip):
    anna, bert = two_people()
    text = "a photo of sks in a garden"
    positive = in_areas(encode(clip, anna, text)[0], encode(clip, bert, text)[0])
    with pytest.raises(IDTokensError) as refused:
        apply_tokens(sd15, positive, 1.0, 0.0, 1.0)
    message = str(refused.value)
    assert "anna.safetensors" in message and "bert.safetensors" in message
    assert "same text" in message and "Change a word" in message and "in the conditioning input" in message


def test_different_text_two_identities_still_work(sd15, clip):
    anna, bert = two_people()
    first, second = encode(clip, anna, "a photo of sks in a garden")[0], encode(clip, bert, "a photo of sks at a desk")[0]
    positive = in_areas(first, second)
    negative = [[torch.zeros_like(first[0][0]), {}]]
    (patched,) = apply_tokens(sd15, positive, 1.0, 0.0, 1.0)
    assert not torch.equal(sample(patched, positive, negative, steps=1), sample(sd15, positive, negative, steps=1))


def test_the_same_identity_twice_is_not_a_conflict(sd15, clip):
    anna, _ = two_people()
    text = "a photo of sks in a garden"
    again = encode(clip, anna, text)[0]  # encoded twice: distinct objects, equal content
    positive = in_areas(encode(clip, anna, text)[0], again)
    apply_tokens(sd15, positive, 1.0, 0.0, 1.0)


def test_chained_apply_nodes_with_the_same_text_are_refused(sd15, clip):
    anna, bert = two_people()
    text = "a photo of sks in a garden"
    anna_cond, bert_cond = encode(clip, anna, text)[0], encode(clip, bert, text)[0]
    (with_anna,) = apply_tokens(sd15, anna_cond, 1.0, 0.0, 1.0)
    with pytest.raises(IDTokensError, match="earlier IDFuse Apply ID Tokens on this model"):
        apply_tokens(with_anna, bert_cond, 1.0, 0.0, 1.0)
    # The other order names the same two files; a different text chains fine.
    with pytest.raises(IDTokensError, match="anna.safetensors.*bert.safetensors|bert.safetensors.*anna.safetensors"):
        apply_tokens(apply_tokens(sd15, bert_cond, 1.0, 0.0, 1.0)[0], anna_cond, 1.0, 0.0, 1.0)
    apply_tokens(with_anna, encode(clip, bert, "a photo of sks at a desk")[0], 1.0, 0.0, 1.0)
    # Chaining the same identity and text again (e.g. another window) is no conflict.
    apply_tokens(with_anna, encode(clip, anna, text)[0], 0.5, 0.5, 1.0)


def test_conflict_is_found_across_prompt_lengths():
    """ComfyUI repeats a 77-token prompt to 154 in a batch with a longer one, so a long prompt made of the
    short one twice has the same rows."""
    short = random_stage_contexts(num_stages=2, seed=1)
    other = random_stage_contexts(num_stages=2, seed=2)
    doubled = StageContexts(family="sd15", placeholder="sks", plain=torch.cat([short.plain] * 2, 1),
                            keys=torch.cat([other.keys] * 2, 1), values=torch.cat([other.values] * 2, 1))
    assert conflicting_prompts([short, doubled]) == (short, doubled)
    same_effect = StageContexts(family="sd15", placeholder="sks", plain=doubled.plain,
                                keys=torch.cat([short.keys] * 2, 1), values=torch.cat([short.values] * 2, 1))
    assert conflicting_prompts([short, same_effect]) is None
    assert conflicting_prompts([short, other]) is None  # different plain text: told apart
    fewer_stages = StageContexts(family="sd15", placeholder="sks", plain=short.plain, keys=short.keys[:1],
                                 values=short.values[:1])
    assert conflicting_prompts([short, fewer_stages]) == (short, fewer_stages)


def test_refused_before_the_model_is_patched(sd15, clip):
    anna, bert = two_people()
    text = "a photo of sks in a garden"
    positive = in_areas(encode(clip, anna, text)[0], encode(clip, bert, text)[0])
    before = dict(sd15.model_options.get("transformer_options", {}).get("patches", {}))
    with pytest.raises(IDTokensError):
        apply_tokens(sd15, positive, 1.0, 0.0, 1.0)
    assert dict(sd15.model_options.get("transformer_options", {}).get("patches", {})) == before
    assert STAGE_CONTEXTS in positive[0][1]
