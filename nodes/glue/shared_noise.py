"""Per-step noise shared by the Infinite-ID streams of one doubled batch.

The guider samples the text rows and the ID rows as one batch. A stochastic sampler (ancestral, SDE,
LCM, DDPM, ...) adds fresh noise at every step for the whole batch it is given, so without this the
ID rows would get other noise than the text rows and drift onto another trajectory. The sampler's
function is given, through its ``noise_sampler`` argument, the noise it would draw itself for a batch
of one stream (ComfyUI's default Gaussian noise sampler, or a Brownian tree with the same
sigma_min/sigma_max/seed and CPU flag for the SDE samplers), repeated for every stream. The text
stream then gets exactly the noise of a plain sampling of its rows.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable

import comfy.k_diffusion.sampling as k_diffusion_sampling
import comfy.samplers
import torch

log = logging.getLogger("idfuse.infinite_id")

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# ComfyUI's sampler functions that draw from a Brownian tree when given no noise sampler, and whether
# that tree lives on the CPU (the ``_gpu`` variants build it on the latent's device). Every other
# function that takes a noise sampler defaults to ComfyUI's Gaussian one.
BROWNIAN_TREE_SAMPLERS: dict[str, bool] = {
    "sample_dpmpp_sde": True,
    "sample_dpmpp_sde_gpu": False,
    "sample_dpmpp_2m_sde": True,
    "sample_dpmpp_2m_sde_gpu": False,
    "sample_dpmpp_2m_sde_heun": True,
    "sample_dpmpp_2m_sde_heun_gpu": False,
    "sample_dpmpp_3m_sde": True,
    "sample_dpmpp_3m_sde_gpu": False,
}


def repeated_rows(noise: torch.Tensor, streams: int) -> torch.Tensor:
    """The first stream's rows of ``noise`` (a batch of ``streams`` equal-sized streams) for every stream."""
    rows = noise.shape[0] // streams
    return noise[:rows].repeat(streams, *([1] * (noise.ndim - 1)))


class SharedNoise:
    """A noise sampler for a batch of ``streams`` streams of ``rows`` rows each: the first ``rows`` rows of
    what ``draw`` gives (one stream's noise, or the whole batch's), repeated for every stream."""

    def __init__(self, draw: NoiseSampler, rows: int, streams: int):
        self.draw = draw
        self.rows = rows
        self.streams = streams

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        noise = self.draw(sigma, sigma_next)[: self.rows]
        return noise.repeat(self.streams, *([1] * (noise.ndim - 1)))


def gaussian_noise_sampler(template: torch.Tensor, seed: int | None) -> NoiseSampler:
    """ComfyUI's default noise sampler for ``template``'s shape, seeded as the sampler functions seed it
    (ComfyUI cores before the seed argument draw from the global generator)."""
    if "seed" in inspect.signature(k_diffusion_sampling.default_noise_sampler).parameters:
        return k_diffusion_sampling.default_noise_sampler(template, seed=seed)
    return k_diffusion_sampling.default_noise_sampler(template)


def stream_noise_sampler(function_name: str, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None,
                         streams: int) -> SharedNoise:
    """The noise ``function_name`` would draw for one stream of ``x``, repeated for every stream."""
    rows = x.shape[0] // streams
    one_stream = x[:rows]
    if function_name in BROWNIAN_TREE_SAMPLERS:
        draw = k_diffusion_sampling.BrownianTreeNoiseSampler(one_stream, sigmas[sigmas > 0].min(), sigmas.max(),
                                                             seed=seed, cpu=BROWNIAN_TREE_SAMPLERS[function_name])
    else:
        draw = gaussian_noise_sampler(one_stream, seed)
    return SharedNoise(draw, rows, streams)


def takes_noise_sampler(function: Callable) -> bool:
    """Whether ``function`` accepts a ``noise_sampler``: by name, or (ComfyUI's own wrappers such as
    dpm_adaptive's) by forwarding its keyword options to a k-diffusion function."""
    parameters = inspect.signature(function).parameters
    if "noise_sampler" in parameters:
        return True
    forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return forwards and getattr(function, "__module__", None) == "comfy.samplers"


def with_shared_noise(sampler, streams: int = 2):
    """A copy of ``sampler`` that gives every stream of its batch the same per-step noise.

    Works on ComfyUI's KSAMPLER (every sampler of KSampler.SAMPLERS and of the custom-sampler nodes);
    the input sampler is not changed. Its function gets a shared ``noise_sampler`` (the one already in
    its options, if any, with its first stream's rows repeated), and the inpainting noise of a denoise
    mask is repeated the same way. Any other sampler is returned as it is.
    """
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        log.warning("The sampler %s is not one of ComfyUI's KSAMPLERs: the per-step noise of the two streams may "
                    "differ.", type(sampler).__name__)
        return sampler
    function = sampler.sampler_function
    name = getattr(function, "__name__", "")
    passes_noise = takes_noise_sampler(function)

    @functools.wraps(function)
    def sample_with_shared_noise(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        # The inpainting noise (the initial noise, or a fresh draw for ddim) of the masked area.
        inpaint_noise = getattr(model, "noise", None)
        if isinstance(inpaint_noise, torch.Tensor) and inpaint_noise.shape[0] == x.shape[0]:
            model.noise = repeated_rows(inpaint_noise, streams)
        if passes_noise:
            given = options.get("noise_sampler")
            if given is not None:
                options["noise_sampler"] = SharedNoise(given, x.shape[0] // streams, streams)
            else:
                seed = (extra_args or {}).get("seed")
                options["noise_sampler"] = stream_noise_sampler(name, x, sigmas, seed, streams)
            log.debug("Shared per-step noise for %s: %s", name, type(options["noise_sampler"].draw).__name__)
        return function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)

    shared = copy.copy(sampler)
    shared.sampler_function = sample_with_shared_noise
    return shared
