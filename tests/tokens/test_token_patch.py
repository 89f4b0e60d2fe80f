"""IDFuseApplyIDTokens: exactness at strength 0, what K and V change, batching, leaks, clone cost."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import make_model, random_stage_contexts, sample, sdxl_extras

from comfyui_idfuse.models.tokens.patch import StageContextPatch
from comfyui_idfuse.nodes.tokens import STAGE_CONTEXTS, IDFuseApplyIDTokens

apply_tokens = IDFuseApplyIDTokens().apply


def id_conditioning(contexts):
    return [[contexts.plain, {STAGE_CONTEXTS: contexts, **sdxl_extras(contexts.plain)}]]


def plain_conditioning(tensor):
    return [[tensor, sdxl_extras(tensor)]]


@pytest.fixture(scope="module")
def sd15():
    return make_model("sd15")


def test_strength_zero_is_bit_exact(sd15):
    contexts = random_stage_contexts()
    positive = id_conditioning(contexts)
    negative = plain_conditioning(torch.randn(1, 77, 768))
    plain = sample(sd15, positive, negative)
    (off,) = apply_tokens(sd15, positive, 0.0, 0.0, 1.0)
    assert torch.equal(sample(off, positive, negative), plain)
    (on,) = apply_tokens(sd15, positive, 1.0, 0.0, 1.0)
    assert not torch.equal(sample(on, positive, negative), plain)


def test_outside_start_end_is_bit_exact(sd15):
    contexts = random_stage_contexts()
    positive, negative = id_conditioning(contexts), plain_conditioning(torch.randn(1, 77, 768))
    plain = sample(sd15, positive, negative)
    # An empty window never acts; the 'normal' schedule's last step is at sigma_min, so a late
    # window would still catch it.
    (never,) = apply_tokens(sd15, positive, 1.0, 0.0, 0.0)
    assert torch.equal(sample(never, positive, negative), plain)
    (early,) = apply_tokens(sd15, positive, 1.0, 0.0, 0.5)
    assert not torch.equal(sample(early, positive, negative), plain)


def _attention_probe(model, layer=("input", 1, 0)):
    """Record projected k, v and the softmax map of one cross-attention layer."""
    from comfy.ldm.modules.attention import optimized_attention

    records = []

    def replace(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        b, n, d = q.shape
        qh = q.view(b, n, heads, d // heads).transpose(1, 2)
        kh = k.view(b, -1, heads, d // heads).transpose(1, 2)
        probs = (qh @ kh.transpose(-1, -2) * (d // heads) ** -0.5).softmax(-1)
        out = optimized_attention(q, k, v, heads)
        records.append({"k": k.clone(), "v": v.clone(), "map": probs, "out": out.clone(),
                        "rows": extra_options["cond_or_uncond"]})
        return out

    model.set_model_attn2_replace(replace, *layer)
    return records


@pytest.mark.parametrize("changed", ["keys", "values"])
def test_keys_move_the_map_values_move_the_output(sd15, changed):
    base = random_stage_contexts()
    same = base.plain.expand_as(base.keys).clone()
    contexts = type(base)(family="sd15", placeholder="sks", plain=base.plain,
                          keys=base.keys if changed == "keys" else same,
                          values=base.values if changed == "values" else same)
    positive, negative = id_conditioning(contexts), plain_conditioning(torch.zeros(1, 77, 768))
    plain_model = sd15.clone()
    plain_records = _attention_probe(plain_model)
    (patched,) = apply_tokens(sd15, positive, 1.0, 0.0, 1.0)
    patched_records = _attention_probe(patched)
    sample(plain_model, positive, negative, steps=1)
    sample(patched, positive, negative, steps=1)
    # input.1 is the first attention layer, so its query is the same in both runs.
    plain_rec, patched_rec = plain_records[0], patched_records[0]
    row = patched_rec["rows"].index(0)
    if changed == "keys":
        assert not torch.equal(plain_rec["map"][row], patched_rec["map"][row])
        assert torch.equal(plain_rec["v"][row], patched_rec["v"][row])
    else:
        assert torch.equal(plain_rec["map"][row], patched_rec["map"][row])
        assert torch.equal(plain_rec["k"][row], patched_rec["k"][row])
        assert not torch.equal(plain_rec["out"][row], patched_rec["out"][row])
    other = 1 - row  # the negative prompt's row is never touched
    assert torch.equal(plain_rec["k"][other], patched_rec["k"][other])
    assert torch.equal(plain_rec["v"][other], patched_rec["v"][other])


def _check_rows(model, contexts_list, positive, negative, **sample_kwargs):
    """Sample with observers around the patch; every row must be exactly what the method says."""
    before, after = [], []
    observed = model.clone()
    observed.set_model_attn2_patch(lambda n, c, v, eo: (before.append((c, v)), (n, c, v))[1])
    (patched,) = apply_tokens(observed, positive, 1.0, 0.0, 1.0)
    patched.set_model_attn2_patch(lambda n, c, v, eo: (after.append((c, v, eo["sigmas"])), (n, c, v))[1])
    sampling = model.get_model_object("model_sampling")
    sample(patched, positive, negative, **sample_kwargs)
    assert before and len(before) == len(after)
    replaced_rows = 0
    for (context, value), (new_k, new_v, sigmas) in zip(before, after, strict=True):
        t = int(sampling.timestep(sigmas[:1]))
        for row in range(context.shape[0]):
            hit = None
            for contexts in contexts_list:
                reps = context.shape[1] // contexts.plain.shape[1]
                if torch.equal(context[row], contexts.plain[0].repeat(reps, 1)):
                    hit = contexts, reps
            if hit is None:
                assert torch.equal(new_k[row], context[row]) and torch.equal(new_v[row], value[row])
            else:
                contexts, reps = hit
                stage = t * contexts.num_stages // 1000
                assert torch.equal(new_k[row], contexts.keys[stage].repeat(reps, 1))
                assert torch.equal(new_v[row], contexts.values[stage].repeat(reps, 1))
                replaced_rows += 1
    return replaced_rows


def test_negative_of_any_length_and_batch(sd15):
    contexts = random_stage_contexts()
    long_negative = plain_conditioning(torch.randn(1, 154, 768))
    assert _check_rows(sd15, [contexts], id_conditioning(contexts), long_negative, batch=2) > 0


def test_long_positive_with_short_negative(sd15):
    contexts = random_stage_contexts(length=154)
    assert _check_rows(sd15, [contexts], id_conditioning(contexts), plain_conditioning(torch.randn(1, 77, 768))) > 0


def test_combined_area_and_timestep_range_conditionings(sd15):
    a, b = random_stage_contexts(seed=1), random_stage_contexts(seed=2)
    other = torch.randn(1, 77, 768)
    positive = [
        [a.plain, {STAGE_CONTEXTS: a, "area": (16, 8, 0, 0), "strength": 1.0, "set_area_to_bounds": False}],
        [b.plain, {STAGE_CONTEXTS: b, "start_percent": 0.0, "end_percent": 0.5}],
        [other, {"area": (16, 8, 0, 8), "strength": 1.0, "set_area_to_bounds": False}],
    ]
    assert _check_rows(sd15, [a, b], positive, plain_conditioning(torch.randn(1, 77, 768)), steps=4) > 0


def test_with_other_patches_and_lora_input_model_untouched():
    import comfy.lora
    import comfy.sd

    model = make_model("sd15")
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    lora_key = next(k for k in key_map if "attn2_to_k" in k and k.startswith("lora_unet_"))
    weight_key = key_map[lora_key]
    out_dim, in_dim = model.model.state_dict()[weight_key].shape
    lora = {f"{lora_key}.lora_up.weight": torch.randn(out_dim, 4), f"{lora_key}.lora_down.weight": torch.randn(4, in_dim)}
    with_lora, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)

    contexts = random_stage_contexts()
    positive, negative = id_conditioning(contexts), plain_conditioning(torch.randn(1, 77, 768))
    options_before = copy.deepcopy(with_lora.model_options)
    patches_before = {k: list(v) for k, v in with_lora.patches.items()}
    reference = sample(with_lora, positive, negative)

    assert _check_rows(with_lora, [contexts], positive, negative) > 0
    (patched,) = apply_tokens(with_lora, positive, 1.0, 0.0, 1.0)
    assert not torch.equal(sample(patched, positive, negative), reference)
    (no_lora,) = apply_tokens(model, positive, 1.0, 0.0, 1.0)
    assert not torch.equal(sample(no_lora, positive, negative), sample(patched, positive, negative))

    assert with_lora.model_options == options_before
    assert {k: list(v) for k, v in with_lora.patches.items()} == patches_before
    assert torch.equal(sample(with_lora, positive, negative), reference)


def _tensor_bytes(obj, seen=None) -> dict[int, int]:
    """Storage pointer -> bytes of every tensor reachable from ``obj``."""
    seen = set() if seen is None else seen
    found: dict[int, int] = {}
    if id(obj) in seen:
        return found
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        found[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    elif isinstance(obj, dict):
        for v in obj.values():
            found.update(_tensor_bytes(v, seen))
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            found.update(_tensor_bytes(v, seen))
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        found.update(_tensor_bytes(vars(obj), seen))
    return found


def test_clone_copies_no_tensors(sd15):
    contexts = random_stage_contexts("sd15", length=154)
    (patched,) = apply_tokens(sd15, id_conditioning(contexts), 1.0, 0.0, 1.0)
    original = _tensor_bytes(patched.model_options)
    assert sum(original.values()) > 1_000_000  # the patch does hold the encodings
    clone = patched.clone()
    copied = {p: n for p, n in _tensor_bytes(clone.model_options).items() if p not in original}
    assert sum(copied.values()) == 0

    # The measure is real: a patch that does not share itself on deepcopy is copied.
    class Naive(StageContextPatch):
        __deepcopy__ = None

    naive_model = sd15.clone()
    naive_model.set_model_attn2_patch(Naive([contexts], 1.0, lambda s: s))
    naive_before = _tensor_bytes(naive_model.model_options)
    naive_copied = {p: n for p, n in _tensor_bytes(naive_model.clone().model_options).items() if p not in naive_before}
    assert sum(naive_copied.values()) > 1_000_000


def test_sdxl_rows():
    model = make_model("sdxl")
    contexts = random_stage_contexts("sdxl")
    assert _check_rows(model, [contexts], id_conditioning(contexts), plain_conditioning(torch.randn(1, 154, 2048))) > 0


def test_family_mismatch_is_a_clear_error(sd15):
    contexts = random_stage_contexts("sdxl")
    with pytest.raises(ValueError, match="encoded for sdxl, but the model is sd15"):
        apply_tokens(sd15, id_conditioning(contexts), 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="holds no identity prompt"):
        apply_tokens(sd15, plain_conditioning(torch.zeros(1, 77, 768)), 1.0, 0.0, 1.0)
