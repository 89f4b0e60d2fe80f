"""Several identities in one token prompt: IDFuse Combine ID Tokens, the joint schedule's segments, splicing."""

from __future__ import annotations

import pytest
import torch
from factories import make_clip, make_id_tokens, make_model, random_stage_contexts, sample

from comfyui_idfuse.models.errors import IDTokensError
from comfyui_idfuse.models.tokens.identity_set import segment_stages
from comfyui_idfuse.models.tokens.patch import StageContextPatch, StageContexts
from comfyui_idfuse.models.unet import stage_of_timestep
from comfyui_idfuse.nodes.tokens import STAGE_CONTEXTS, IDFuseApplyIDTokens, IDFuseCombineIDTokens, IDFuseEncodeWithID

encode = IDFuseEncodeWithID().encode
combine = IDFuseCombineIDTokens().combine
apply_tokens = IDFuseApplyIDTokens().apply

TEXT = "a photo of sks and ohwx shaking hands in paris"


@pytest.fixture(scope="module")
def clip(tokenizer_dir):
    return make_clip("sd15", tokenizer_dir)


@pytest.fixture(scope="module")
def pair():
    return (make_id_tokens(num_stages=2, placeholder="sks", initializer="person", seed=1),
            make_id_tokens(num_stages=3, placeholder="ohwx", initializer="man", seed=2))


def contexts_of(conditioning) -> StageContexts:
    ((_cond, options),) = conditioning
    return options[STAGE_CONTEXTS]


def test_segments_are_the_union_of_the_schedules():
    # Boundaries 500 (2 stages) and 333.3, 666.7 (3 stages): four segments.
    assert segment_stages([2, 3]) == ((0, 0), (0, 1), (1, 1), (1, 2))
    assert segment_stages([5]) == tuple((s,) for s in range(5))
    assert segment_stages([2, 4]) == ((0, 0), (0, 1), (1, 2), (1, 3))  # shared boundary at 500: counted once
    assert segment_stages([3, 3, 3]) == ((0, 0, 0), (1, 1, 1), (2, 2, 2))


def test_each_placeholder_gets_its_own_vectors_in_every_segment(clip, pair):
    first, second = pair
    contexts = contexts_of(encode(clip, combine(first, second)[0], TEXT)[0])
    assert contexts.segments == segment_stages([2, 3]) and contexts.keys.shape[0] == 4
    raw = clip.tokenize(TEXT)
    positions = {word: next(i for i, t in enumerate(raw["l"][0]) if t[0] == clip.tokenize(word)["l"][0][1][0])
                 for word in ("sks", "ohwx")}
    for table in ("keys", "values"):
        for segment, (stage_a, stage_b) in enumerate(contexts.segments):
            spliced = clip.tokenize(TEXT)
            spliced["l"][0][positions["sks"]] = (getattr(first, table)["clip_l"][stage_a], 1.0)
            spliced["l"][0][positions["ohwx"]] = (getattr(second, table)["clip_l"][stage_b], 1.0)
            with torch.no_grad():
                expected = clip.encode_from_tokens(spliced)
            assert torch.equal(getattr(contexts, table)[segment:segment + 1], expected), (table, segment)
    # The plain prompt has each identity's own initialiser word.
    with torch.no_grad():
        plain = clip.encode_from_tokens(clip.tokenize("a photo of person and man shaking hands in paris"))
    assert torch.equal(contexts.plain, plain)


def test_cost_grows_with_segments_not_their_product(clip, pair, monkeypatch):
    calls = []
    original = type(clip).encode_from_tokens
    monkeypatch.setattr(type(clip), "encode_from_tokens", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    encode(clip, combine(*pair)[0], TEXT)
    assert len(calls) == 1 + 2 * 4  # plain, then K and V per segment (not 2 x 3 stage pairs)


def test_one_identity_set_is_bit_identical_to_the_single_identity(clip):
    tokens = make_id_tokens(num_stages=3)
    single = encode(clip, tokens, "a photo of sks")[0]
    from comfyui_idfuse.models.tokens.identity_set import as_identity_set

    as_set = encode(clip, as_identity_set(tokens), "a photo of sks")[0]
    one, other = contexts_of(single), contexts_of(as_set)
    assert torch.equal(single[0][0], as_set[0][0])
    assert torch.equal(one.keys, other.keys) and torch.equal(one.values, other.values)
    assert one.segments == other.segments == ((0,), (1,), (2,))
    model = make_model("sd15")
    negative = [[torch.zeros(1, 77, 768), {}]]
    (with_single,) = apply_tokens(model, single, 1.0, 0.0, 1.0)
    (with_set,) = apply_tokens(model, as_set, 1.0, 0.0, 1.0)
    assert torch.equal(sample(with_single, single, negative, steps=2), sample(with_set, as_set, negative, steps=2))


def test_combining_chains_any_number(clip, pair):
    third = make_id_tokens(num_stages=1, placeholder="hta", initializer="woman", seed=3)
    chained = combine(combine(*pair)[0], third)[0]
    assert [m.placeholder for m in chained.members] == ["sks", "ohwx", "hta"]
    contexts = contexts_of(encode(clip, chained, "sks, ohwx and hta at a table")[0])
    assert contexts.placeholders == ("sks", "ohwx", "hta") and contexts.stage_counts == (2, 3, 1)


def test_errors_name_the_inputs(clip, pair):
    first, second = pair
    with pytest.raises(IDTokensError, match="id_tokens_a .* and id_tokens_b .* both use the placeholder word 'sks'"):
        combine(first, make_id_tokens(placeholder="sks", seed=5))
    with pytest.raises(IDTokensError, match="id_tokens_a .* is a SD1.5 identity but id_tokens_b .* is SDXL"):
        combine(first, make_id_tokens("sdxl", placeholder="ohwx"))
    with pytest.raises(IDTokensError, match="does not contain the placeholder word 'ohwx'.*each placeholder once"):
        encode(clip, combine(first, second)[0], "a photo of sks")


def test_patch_picks_each_segment_at_the_boundary_sigmas():
    """At the timesteps of every boundary (and just around them) the rows get the segment whose stages are
    each identity's own stage_of_timestep there."""
    base = random_stage_contexts(num_stages=4)
    contexts = StageContexts(family="sd15", placeholder="sks", plain=base.plain, keys=base.keys, values=base.values,
                             placeholders=("sks", "ohwx"), stage_counts=(2, 3), segments=segment_stages([2, 3]))
    patch = StageContextPatch([contexts], 1.0, timestep_of_sigma=lambda sigma: sigma)  # sigma "is" the timestep
    boundaries = [1000 / 3, 500.0, 2000 / 3]
    checked = set()
    for t in [0.0, 999.0] + [b + d for b in boundaries for d in (-1e-3, 0.0, 1e-3)]:
        context = base.plain.clone()
        _n, keys, values = patch(None, context, context, {"sigmas": torch.tensor([t])})
        expected = (int(stage_of_timestep(t, 2)), int(stage_of_timestep(t, 3)))
        segment = contexts.segments.index(expected)
        assert torch.equal(keys[0], base.keys[segment]) and torch.equal(values[0], base.values[segment]), t
        checked.add(segment)
    assert checked == {0, 1, 2, 3}


def test_patch_segments_at_the_real_models_boundary_sigmas():
    model = make_model("sd15")
    sampling = model.get_model_object("model_sampling")
    base = random_stage_contexts(num_stages=4)
    contexts = StageContexts(family="sd15", placeholder="sks", plain=base.plain, keys=base.keys, values=base.values,
                             placeholders=("sks", "ohwx"), stage_counts=(2, 3), segments=segment_stages([2, 3]))
    patch = StageContextPatch([contexts], 1.0, timestep_of_sigma=sampling.timestep)
    for t in (333, 334, 500, 501, 666, 667):
        sigma = sampling.sigma(torch.tensor([float(t)]))
        _n, keys, _v = patch(None, base.plain, base.plain, {"sigmas": sigma})
        timestep = sampling.timestep(sigma)
        expected = (int(stage_of_timestep(timestep, 2)), int(stage_of_timestep(timestep, 3)))
        assert torch.equal(keys[0], base.keys[contexts.segments.index(expected)]), t


def test_same_text_check_still_refuses_sets(clip, pair):
    first, second = pair
    a = encode(clip, combine(first, second)[0], TEXT)[0]
    other_second = make_id_tokens(num_stages=3, placeholder="ohwx", initializer="man", seed=9)
    b = encode(clip, combine(first, other_second)[0], TEXT)[0]
    model = make_model("sd15")
    with pytest.raises(IDTokensError, match="same text"):
        apply_tokens(model, a + b, 1.0, 0.0, 1.0)
    apply_tokens(model, a + encode(clip, combine(first, second)[0], TEXT)[0], 1.0, 0.0, 1.0)  # equal: fine
