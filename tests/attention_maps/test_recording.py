"""The recording on small UNets: the map equals an independent softmax computation, the sampled image is
unchanged bit for bit (plain prompts, identity tokens, Infinite-ID), re-runs start over, memory is bounded."""

from __future__ import annotations

import comfy.samplers
import pytest
import torch
from factories import make_clip, make_id_tokens, make_model, random_id_layers, sample
from torch.nn import functional as F

from comfyui_idfuse.models.attention_maps.layers import layers_of
from comfyui_idfuse.models.errors import IDFuseInputError
from comfyui_idfuse.models.infinite_id.settings import InfiniteIDSettings
from comfyui_idfuse.models.unet import cross_attention_path, layer_grid
from comfyui_idfuse.nodes.attention_map import IDFuseAttentionMap
from comfyui_idfuse.nodes.glue.infinite_id import TwoStreamGuider, two_stream_model
from comfyui_idfuse.nodes.tokens import IDFuseApplyIDTokens, IDFuseEncodeWithID

TEXT = "a photo of sks person in a red hat"
SKS, HAT = (4,), (9,)  # <start> a photo of sks person in a red hat
SIZE, STEPS = 16, 6
attention_map = IDFuseAttentionMap().record


@pytest.fixture(scope="module")
def sd15():
    return make_model("sd15")


@pytest.fixture(scope="module")
def clip(tokenizer_dir):
    return make_clip("sd15", tokenizer_dir)


def encoded(clip, text):
    with torch.no_grad():
        return [[clip.encode_from_tokens(clip.tokenize(text)), {}]]


class Capture:
    """Every call of the chosen layers' cross-attention during sampling, seen from outside the pack: the
    transformer options of the block (from a forward pre-hook), the normalised hidden states the layer's
    query is made from (norm2's output) and the context its keys are made from."""

    def __init__(self, model, keys, keys_context_from_attn2: bool):
        unet = model.model.diffusion_model
        self.calls: list[dict] = []
        self.handles = []
        for key in keys:
            attn2_path = cross_attention_path(unet, key)
            block = unet.get_submodule(attn2_path.rsplit(".", 1)[0])
            self.handles.append(block.register_forward_pre_hook(self._block(key, block), with_kwargs=True))
            self.handles.append(block.norm2.register_forward_hook(self._norm2))
            if keys_context_from_attn2:
                self.handles.append(block.attn2.register_forward_pre_hook(self._attn2, with_kwargs=True))

    def _block(self, key, block):
        def hook(_module, args, kwargs):
            options = kwargs["transformer_options"]
            self.calls.append({"key": key, "attn2": block.attn2, "context": kwargs.get("context", args[1:2] or None),
                               "cond_or_uncond": list(options["cond_or_uncond"]),
                               "sigma": float(options["sigmas"].reshape(-1)[0]),
                               "shape": options["original_shape"]})
        return hook

    def _norm2(self, _module, _args, output):
        self.calls[-1]["n"] = output.detach().clone()

    def _attn2(self, _module, _args, kwargs):
        self.calls[-1]["context"] = kwargs["context"].detach().clone()

    def close(self):
        for handle in self.handles:
            handle.remove()


def independent_maps(calls, words, sigma_start, sigma_end, size, streams=1):
    """softmax(Q Kᵀ/√d) per head with the layer's weights, mean over heads, each word's columns summed, on the
    positive rows (with two streams: ID rows first, then text rows), upsampled and averaged over calls."""
    total, count = 0.0, 0
    for call in calls:
        if not sigma_end <= call["sigma"] <= sigma_start:
            continue
        attn2, n, context = call["attn2"], call["n"], call["context"]
        chunks = call["cond_or_uncond"]
        per = n.shape[0] // len(chunks)
        images = per // streams
        rows = []
        for chunk, kind in enumerate(chunks):
            if kind == 0:
                for stream in reversed(range(streams)):
                    rows += range(chunk * per + stream * images, chunk * per + (stream + 1) * images)
        q = F.linear(n[rows].double(), attn2.to_q.weight.double())
        k = F.linear(context[rows].double(), attn2.to_k.weight.double())
        heads = attn2.heads
        qh = q.view(len(rows), q.shape[1], heads, -1).permute(0, 2, 1, 3)
        kh = k.view(len(rows), k.shape[1], heads, -1).permute(0, 2, 1, 3)
        scores = torch.einsum("bhqd,bhkd->bhqk", qh, kh) / qh.shape[-1] ** 0.5
        probs = torch.exp(scores - scores.amax(-1, keepdim=True))
        probs = (probs / probs.sum(-1, keepdim=True)).mean(1)  # (rows, queries, keys)
        grid = layer_grid(call["shape"][-2:], call["key"].downscale)
        per_word = torch.stack([probs[..., list(p)].sum(-1) for p in words], 1).view(len(rows), len(words), *grid)
        total = total + F.interpolate(per_word.float(), size=size, mode="bilinear", align_corners=False)
        count += 1
    assert count, "no call inside the window: the test does not test anything"
    return total / count


def test_map_equals_an_independent_softmax_and_the_image_is_unchanged(sd15, clip):
    positive, negative = encoded(clip, TEXT), encoded(clip, "blurry")
    patched, record = attention_map(sd15, clip, TEXT, "sks, red hat", "mid-resolution", 0.3, 0.7)
    capture = Capture(sd15, layers_of("sd15", "mid-resolution"), keys_context_from_attn2=True)
    try:
        with_map = sample(patched, positive, negative, steps=STEPS, size=SIZE)
    finally:
        capture.close()
    without = sample(sd15, positive, negative, steps=STEPS, size=SIZE)
    assert torch.equal(with_map, without)
    assert [w.positions for w in record.words] == [SKS, (8, 9)]
    expected = independent_maps(capture.calls, [SKS, (8, 9)], record.sigma_start, record.sigma_end, (64, 64))
    assert torch.allclose(record.maps((64, 64)), expected, atol=1e-5)
    assert 0 < record.steps < STEPS  # the window left some steps out


def test_with_identity_tokens_it_records_the_keys_the_layer_attends_to(sd15, clip):
    tokens = make_id_tokens("sd15", num_stages=3, scale=3.0)
    conditioning = IDFuseEncodeWithID().encode(clip, tokens, TEXT)[0]
    negative = encoded(clip, "blurry")
    with_tokens = IDFuseApplyIDTokens().apply(sd15, conditioning, 1.0, 0.0, 1.0)[0]
    patched, record = attention_map(with_tokens, clip, TEXT, "", "all", 0.0, 1.0)  # words: the placeholder
    assert [w.word for w in record.words] == ["sks"]
    capture = Capture(sd15, layers_of("sd15", "all"), keys_context_from_attn2=True)
    try:
        image = sample(patched, conditioning, negative, steps=3, size=SIZE)
    finally:
        capture.close()
    assert torch.equal(image, sample(with_tokens, conditioning, negative, steps=3, size=SIZE))
    expected = independent_maps(capture.calls, [SKS], record.sigma_start, record.sigma_end, (32, 32))
    maps = record.maps((32, 32))
    assert torch.allclose(maps, expected, atol=1e-5)
    # The token patch's keys, not the plain prompt's: a record on the model without it differs.
    plain, plain_record = attention_map(sd15, clip, TEXT, "sks", "all", 0.0, 1.0)
    sample(plain, conditioning, negative, steps=3, size=SIZE)
    assert not torch.allclose(plain_record.maps((32, 32)), maps, atol=1e-4)
    # The same maps when the token patch is added after the attention map node (its probe always runs last).
    before, before_record = attention_map(sd15, clip, TEXT, "sks", "all", 0.0, 1.0)
    after_tokens = IDFuseApplyIDTokens().apply(before, conditioning, 1.0, 0.0, 1.0)[0]
    sample(after_tokens, conditioning, negative, steps=3, size=SIZE)
    assert torch.equal(before_record.maps((32, 32)), maps)


def test_infinite_id_records_both_streams_and_leaves_the_image_unchanged(sd15, clip):
    positive, negative = encoded(clip, TEXT), encoded(clip, "blurry")
    settings = InfiniteIDSettings(id_weight=1.0, mixing=True)
    id_layers = random_id_layers(sd15, "sd15")
    noise = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "normal", 3)

    def run(model):
        guider = TwoStreamGuider(two_stream_model(model, id_layers, settings), return_text_stream=True)
        guider.set_conds(positive, negative)
        guider.set_cfg(5.0)
        with torch.inference_mode():
            return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0)

    patched, record = attention_map(sd15, clip, TEXT, "sks, hat", "mid-resolution", 0.0, 1.0)
    capture = Capture(sd15, layers_of("sd15", "mid-resolution"), keys_context_from_attn2=False)
    try:
        with_map = run(patched)
    finally:
        capture.close()
    assert torch.equal(with_map, run(sd15))
    assert record.streams == 2 and record.rows == 2
    expected = independent_maps(capture.calls, [SKS, HAT], record.sigma_start, record.sigma_end, (32, 32), streams=2)
    maps = record.maps((32, 32))
    assert torch.allclose(maps, expected, atol=1e-5)
    assert not torch.allclose(maps[0], maps[1], atol=1e-4)  # mixed self-attention changes the ID stream


def test_a_rerun_starts_over_and_memory_does_not_grow_with_steps(sd15, clip):
    positive, negative = encoded(clip, TEXT), encoded(clip, "blurry")
    patched, record = attention_map(sd15, clip, TEXT, "sks", "trained layers", 0.0, 1.0)
    sample(patched, positive, negative, steps=2, seed=1, size=SIZE)
    size_after_two = record.state_size()
    sample(patched, positive, negative, steps=8, seed=2, size=SIZE)
    assert record.state_size() == size_after_two and record.steps == 8
    fresh, fresh_record = attention_map(sd15, clip, TEXT, "sks", "trained layers", 0.0, 1.0)
    sample(fresh, positive, negative, steps=8, seed=2, size=SIZE)
    assert torch.equal(record.maps((32, 32)), fresh_record.maps((32, 32)))


def test_input_model_untouched_and_clear_errors(sd15, clip):
    attention_map(sd15, clip, TEXT, "sks", "mid-resolution", 0.3, 0.7)
    assert "model_function_wrapper" not in sd15.model_options
    with pytest.raises(IDFuseInputError, match="no identity tokens"):
        attention_map(sd15, clip, TEXT, "", "mid-resolution", 0.3, 0.7)
    with pytest.raises(IDFuseInputError, match="does not contain 'dog'"):
        attention_map(sd15, clip, TEXT, "sks, dog", "mid-resolution", 0.3, 0.7)
    with pytest.raises(IDFuseInputError, match="start_percent"):
        attention_map(sd15, clip, TEXT, "sks", "mid-resolution", 0.8, 0.2)
