"""IDFuseEncodeWithID and IDFuseLoadIDTokens with ComfyUI's CLIP (real tokenizer, narrow encoders)."""

from __future__ import annotations

import pytest
import torch
from factories import make_clip, make_id_tokens, make_model, sample

from comfyui_idfuse.models.tokens.format import IDTokensError
from comfyui_idfuse.nodes.tokens import STAGE_CONTEXTS, IDFuseApplyIDTokens, IDFuseEncodeWithID, IDFuseLoadIDTokens

encode = IDFuseEncodeWithID().encode


@pytest.fixture(scope="module")
def clips(tokenizer_dir):
    return {family: make_clip(family, tokenizer_dir) for family in ("sd15", "sdxl")}


def clip_text_encode(clip, text):
    """What ComfyUI's CLIPTextEncode does."""
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_plain_is_the_prompt_with_the_initializer(clips, family):
    clip, tokens = clips[family], make_id_tokens(family, num_stages=3)
    ((cond, options),) = encode(clip, tokens, "an old sks holding a basketball, Eiffel Tower behind")[0]
    reference, pooled = clip_text_encode(clip, "an old person holding a basketball, Eiffel Tower behind")
    assert torch.equal(cond, reference)
    assert torch.equal(options["pooled_output"], pooled)
    contexts = options[STAGE_CONTEXTS]
    assert contexts.keys.shape == (3, *cond.shape[1:]) and contexts.values.shape == contexts.keys.shape
    # Tokens before the placeholder are unaffected (causal text encoder); from it on they differ.
    position = 3  # <start> an old sks
    assert torch.equal(contexts.keys[0, :position], cond[0, :position])
    assert not torch.equal(contexts.keys[0, position], cond[0, position])
    assert not torch.equal(contexts.keys[0], contexts.values[0])
    assert not torch.equal(contexts.keys[0], contexts.keys[1])


def test_stage_vector_is_spliced_at_the_placeholder(clips):
    """The K encoding equals encoding the prompt with that vector as the word's embedding."""
    clip, tokens = clips["sd15"], make_id_tokens("sd15", num_stages=2)
    ((_cond, options),) = encode(clip, tokens, "a photo of sks")[0]
    raw = clip.tokenize("a photo of sks")
    raw["l"][0][4] = (tokens.keys["clip_l"][1], 1.0)
    with torch.no_grad():
        expected = clip.encode_from_tokens(raw)
    assert torch.equal(options[STAGE_CONTEXTS].keys[1:2], expected)


def test_prompt_errors(clips):
    clip = clips["sd15"]
    with pytest.raises(IDTokensError, match="does not contain the placeholder word 'sks'"):
        encode(clip, make_id_tokens(), "a photo of a person")
    with pytest.raises(IDTokensError, match="placeholder word 'xyzzyplugh' is .* tokens"):
        encode(clip, make_id_tokens(placeholder="xyzzyplugh"), "a photo of xyzzyplugh")
    with pytest.raises(IDTokensError, match="made for SDXL, but the model is SD1.5"):
        encode(clip, make_id_tokens("sdxl"), "a photo of sks")


def test_weighted_and_long_prompts(clips):
    clip, tokens = clips["sd15"], make_id_tokens()
    long_text = "(sks:1.2) walking, " + ", ".join(["a very detailed scene"] * 20)
    ((cond, options),) = encode(clip, tokens, long_text)[0]
    assert cond.shape[1] == 154 and options[STAGE_CONTEXTS].keys.shape[1] == 154


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_encode_apply_sample(clips, family):
    clip, model = clips[family], make_model(family)
    positive = encode(clip, make_id_tokens(family), "a photo of sks in a spacesuit")[0]
    negative = [[*clip_text_encode(clip, "blurry")[:1], {"pooled_output": clip_text_encode(clip, "blurry")[1]}]]
    plain = sample(model, positive, negative, steps=2)
    (patched,) = IDFuseApplyIDTokens().apply(model, positive, 1.0, 0.0, 1.0)
    out = sample(patched, positive, negative, steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_load_node_lists_and_loads(tmp_path):
    import folder_paths

    folder = folder_paths.get_folder_paths("idfuse_tokens")[0]
    make_id_tokens().save(f"{folder}/me.safetensors")
    choices = IDFuseLoadIDTokens.INPUT_TYPES()["required"]["tokens_name"][0]
    assert "me.safetensors" in choices
    (tokens,) = IDFuseLoadIDTokens().load("me.safetensors")
    assert tokens.placeholder == "sks"
    with pytest.raises(IDTokensError, match="'gone.safetensors' not found in models/idfuse/tokens"):
        IDFuseLoadIDTokens().load("gone.safetensors")
