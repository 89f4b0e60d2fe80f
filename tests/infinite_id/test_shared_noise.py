"""Both Infinite-ID streams get the same per-step noise, for every sampler ComfyUI offers.

The noise a stochastic sampler adds at each step is drawn for the whole doubled batch unless the
guider gives it a shared noise source; these tests compare the ID rows with the text rows, and the
text rows with ComfyUI's own sampling of a batch of one stream.
"""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace

import pytest
import torch
from factories import make_model, random_id_layers
from ip_adapter_files import FITS_TEST_UNETS, write_faceid

from comfyui_idfuse.models.infinite_id.settings import InfiniteIDSettings
from comfyui_idfuse.nodes.glue.infinite_id import TwoStreamGuider, two_stream_model
from comfyui_idfuse.nodes.glue.shared_noise import SharedNoise, with_shared_noise

# Measured: a batch of one stream and the same rows inside the doubled batch differ by at most
# ~8e-6 of the latent's magnitude after sampling (CPU kernels round differently per batch size);
# different per-step noise moves the result by percents.
BATCH_KERNEL_RTOL = 5e-5
STEPS = 2
SIZE = 8
SEED = 7

OFF = InfiniteIDSettings(id_weight=0.0, mixing=False)
ON = InfiniteIDSettings(id_weight=1.0, mixing=True)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0.0, atol=BATCH_KERNEL_RTOL * float(b.abs().max()))


@pytest.fixture(scope="module")
def sd15():
    return make_model("sd15")


@pytest.fixture(scope="module")
def conds():
    cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5))
    return [[cond, {}]], [[cond.flip(1), {}]]


@pytest.fixture(scope="module")
def sigmas(sd15):
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "normal", STEPS)


def initial_noise(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def two_streams(model, conds, sampler, sigmas, noise, settings=OFF, cfg=5.0, **kwargs):
    """(text stream, ID stream) of the guider; the global generator seeded as for the plain run (ComfyUI
    cores without seeded noise samplers draw from it)."""
    guider = TwoStreamGuider(two_stream_model(model, random_id_layers(model, "sd15"), settings),
                             return_text_stream=True)
    guider.set_conds(*conds)
    guider.set_cfg(cfg)
    torch.manual_seed(1)
    with torch.inference_mode():
        out = guider.sample(noise, kwargs.pop("latent", torch.zeros_like(noise)), sampler, sigmas, disable_pbar=True,
                            seed=SEED, **kwargs)
    batch = noise.shape[0]
    return out[batch:], out[:batch]


def plain(model, conds, sampler, sigmas, noise, cfg=5.0, **kwargs):
    """ComfyUI's own sampling of one stream's batch."""
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(*conds)
    guider.set_cfg(cfg)
    torch.manual_seed(1)
    with torch.inference_mode():
        return guider.sample(noise, kwargs.pop("latent", torch.zeros_like(noise)), sampler, sigmas, disable_pbar=True,
                             seed=SEED, **kwargs)


def every_sampler():
    import comfy.samplers

    return comfy.samplers.KSampler.SAMPLERS


@pytest.mark.parametrize("name", every_sampler())
def test_id_stream_is_the_text_stream_and_the_text_stream_plain_sampling(sd15, conds, sigmas, name):
    import comfy.samplers

    if name == "dpm_adaptive":  # chooses its own steps down to the last nonzero sigma: a short interval
        sigmas = torch.tensor([float(sigmas[0]), 0.9 * float(sigmas[0]), 0.0])
    noise = initial_noise()
    # cfg 1 (ComfyUI then skips the negative) halves the UNet's batch; the streams' noise is the point here.
    text, ident = two_streams(sd15, conds, comfy.samplers.sampler_object(name), sigmas, noise, cfg=1.0)
    assert torch.isfinite(ident).all()
    assert close(ident, text), f"{name}: the ID stream left the text stream ({(ident - text).abs().max():.3g})"
    reference = plain(sd15, conds, comfy.samplers.sampler_object(name), sigmas, noise, cfg=1.0)
    assert close(text, reference), f"{name}: the text stream is not ComfyUI's sampling ({(text - reference).abs().max():.3g})"


def default_noise_of(function_name: str, x: torch.Tensor, sigmas: torch.Tensor, seed: int):
    """The noise sampler ComfyUI's sampler function builds for ``x`` when given none."""
    import comfy.k_diffusion.sampling as k

    if "sde" in function_name:
        positive = sigmas[sigmas > 0]
        return k.BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=seed,
                                          cpu=not function_name.endswith("_gpu"))
    if "seed" in inspect.signature(k.default_noise_sampler).parameters:
        return k.default_noise_sampler(x, seed=seed)
    return k.default_noise_sampler(x)


def recording(sampler, drawn: list):
    """A copy of a KSAMPLER whose function records the per-step noise it uses (its own default noise
    sampler when it is given none)."""
    import copy

    function = sampler.sampler_function

    @functools.wraps(function)
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options):
        source = noise_sampler or default_noise_of(function.__name__, x, sigmas, extra_args.get("seed"))

        def record(sigma, sigma_next):
            drawn.append(source(sigma, sigma_next))
            return drawn[-1]

        return function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                        noise_sampler=record, **options)

    recorded = copy.copy(sampler)
    recorded.sampler_function = sample
    return recorded


@pytest.mark.parametrize(("name", "options", "batch"), [
    ("euler_ancestral", {"eta": 0.7, "s_noise": 0.9}, 2),  # as SamplerEulerAncestral makes it
    ("dpmpp_sde", {}, 1),  # a Brownian tree on the CPU
    ("dpmpp_2m_sde_gpu", {"eta": 1.0, "s_noise": 1.0, "solver_type": "heun"}, 2),  # a tree on the latent's device
])
def test_with_identity_on_both_streams_get_the_same_noise(sd15, conds, sigmas, name, options, batch):
    import comfy.samplers

    noise = initial_noise(batch)
    drawn: list[torch.Tensor] = []
    text, ident = two_streams(sd15, conds, recording(comfy.samplers.ksampler(name, options), drawn), sigmas, noise, ON)
    assert drawn and not torch.equal(ident, text)
    for step in drawn:
        assert step.shape[0] == 2 * batch
        assert torch.equal(step[:batch], step[batch:])
    assert not torch.equal(drawn[0][:1], drawn[-1][:1])  # fresh noise at every step
    plain_drawn: list[torch.Tensor] = []
    plain(sd15, conds, recording(comfy.samplers.ksampler(name, options), plain_drawn), sigmas, noise)
    assert len(plain_drawn) == len(drawn)
    for step, reference in zip(drawn, plain_drawn, strict=True):
        assert torch.equal(step[:batch], reference)  # the text stream's noise is what ComfyUI draws for it


def test_inpainting_noise_is_shared(sd15, conds, sigmas):
    """ddim draws its own noise for the masked area of a denoise mask."""
    import comfy.samplers

    noise = initial_noise()
    latent = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., : SIZE // 2] = 1.0
    text, ident = two_streams(sd15, conds, comfy.samplers.sampler_object("ddim"), sigmas, noise, latent=latent,
                              denoise_mask=mask)
    assert close(ident, text)


def test_a_noise_sampler_of_the_options_is_shared():
    batch = torch.arange(4.0).view(4, 1)  # two streams of two rows
    shared = SharedNoise(lambda _s, _n: batch, rows=2, streams=2)
    assert shared(torch.tensor(1.0), torch.tensor(0.5)).flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    one_stream = SharedNoise(lambda _s, _n: batch[:2], rows=2, streams=2)
    assert one_stream(torch.tensor(1.0), torch.tensor(0.5)).flatten().tolist() == [0.0, 1.0, 0.0, 1.0]


def test_the_input_sampler_is_unchanged_and_other_samplers_pass_through(caplog):
    import comfy.samplers

    sampler = comfy.samplers.ksampler("euler_ancestral", {"eta": 0.5})
    function = sampler.sampler_function
    shared = with_shared_noise(sampler)
    assert sampler.sampler_function is function and sampler.extra_options == {"eta": 0.5}
    assert shared is not sampler and shared.sampler_function is not function

    class OtherSampler(comfy.samplers.Sampler):
        def sample(self, *args, **kwargs):
            raise NotImplementedError

    other = OtherSampler()
    with caplog.at_level("WARNING", logger="idfuse.infinite_id"):
        assert with_shared_noise(other) is other
    assert "may differ" in caplog.text


def test_sampler_node_shares_the_noise(sd15):
    """IDFuse Infinite-ID Sampler with an ancestral sampler: ID weight 0 and mixing off give the text stream."""
    import folder_paths

    from comfyui_idfuse.nodes.encoders import IDFuseLoadIDEncoder
    from comfyui_idfuse.nodes.infinite_id import IDFuseInfiniteIDSampler

    folder = folder_paths.get_folder_paths("ipadapter")[0]
    write_faceid(f"{folder}/ip-adapter-faceid_sd15_shared_noise.bin", "faceid", "sd15", FITS_TEST_UNETS)
    encoder = IDFuseLoadIDEncoder().load("ipadapter/ip-adapter-faceid_sd15_shared_noise.bin")[0]
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(0)), dim=-1)
    settings = {"id_weight": 0.0, "id_start_percent": 0.0, "id_end_percent": 1.0, "mixing": False,
                "mix_blocks": "all", "mix_start_percent": 0.0, "mix_end_percent": 1.0, "adain": "mean",
                "encoder_lora_strength": 0.0}
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
    with torch.inference_mode():
        ident, text = IDFuseInfiniteIDSampler().sample(
            sd15, cond, cond, encoder, SimpleNamespace(arcface=face, clip_hidden=None),
            {"samples": torch.zeros(1, 4, SIZE, SIZE)}, seed=3, steps=STEPS, cfg=5.0, sampler_name="euler_ancestral",
            scheduler="normal", denoise=1.0, **settings)
    assert close(ident["samples"], text["samples"])
