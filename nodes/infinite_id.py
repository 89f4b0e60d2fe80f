"""Infinite-ID two-stream sampling: a GUIDER for SamplerCustomAdvanced and a KSampler-style node.

Both streams start from the same noise and are denoised in one batched UNet pass: the batch
is doubled (text stream rows, then ID stream rows) and the attention patches of
``models.infinite_id`` act on the ID rows only. Classifier-free guidance is applied to each
stream separately with the same cfg: each stream has its own positive and negative rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy.ldm.modules.attention import optimized_attention

from ..models.blocks import block_keys
from ..models.infinite_id import ADAIN_MODES, IDCrossAttention, IDKeysValues, MixedSelfAttention, SigmaWindow
from .lora_glue import with_lora
from .model_info import cross_attention_widths, model_family

log = logging.getLogger(__name__)

CATEGORY = "IDFuse/Infinite-ID"

# Which UNet parts use mixed self-attention.
MIX_BLOCKS: dict[str, tuple[str, ...]] = {
    "all": ("input", "middle", "output"),
    "middle+output": ("middle", "output"),
    "output": ("output",),
    "input": ("input",),
    "middle": ("middle",),
}


@dataclass(frozen=True)
class InfiniteIDSettings:
    id_weight: float = 1.0
    id_start: float = 0.0
    id_end: float = 1.0
    mixing: bool = True
    mix_blocks: str = "all"
    mix_start: float = 0.0
    mix_end: float = 1.0
    adain: str = "mean"
    lora_strength: float = 0.0


def _window(model, start: float, end: float) -> SigmaWindow:
    sampling = model.get_model_object("model_sampling")
    if start > end:
        raise ValueError(f"start percent ({start}) is after end percent ({end}); set start <= end.")
    return SigmaWindow(float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end)))


def two_stream_model(model, layers: dict[tuple[str, int, int], IDKeysValues], settings: InfiniteIDSettings):
    """A clone of ``model`` whose attention runs the ID stream on the second half of each chunk."""
    family = model_family(model)
    keys = block_keys(family)
    missing = [str(k) for k in keys if k.key not in layers]
    if missing:
        raise ValueError(f"The ID encoder has no ID keys/values for layers {missing[:4]}...; it does not fit "
                         f"this {family} model.")
    widths = cross_attention_widths(model)
    wrong = [f"{key}: {layers[key].k_cond.shape[-1]} != {width}" for key, width in widths.items()
             if layers[key].k_cond.shape[-1] != width]
    if wrong:
        raise ValueError(f"The ID encoder's keys/values do not fit this model's cross-attention widths "
                         f"({', '.join(wrong[:3])}); use an encoder made for this model family.")
    if settings.adain not in ADAIN_MODES:
        raise ValueError(f"adain must be one of {sorted(ADAIN_MODES)}")
    patched = model.clone()
    cross = IDCrossAttention(optimized_attention, layers, settings.id_weight,
                             _window(model, settings.id_start, settings.id_end))
    mixed = MixedSelfAttention(optimized_attention, settings.adain, _window(model, settings.mix_start, settings.mix_end))
    for key in keys:
        patched.set_model_attn2_replace(cross, *key.key)
        if settings.mixing and key.block in MIX_BLOCKS[settings.mix_blocks]:
            patched.set_model_attn1_replace(mixed, *key.key)
    return patched


class TwoStreamGuider(comfy.samplers.CFGGuider):
    """CFG guider that denoises a text stream and an ID stream from the same noise in one batch.

    ``sample`` returns the ID stream, or both streams concatenated (ID first) when
    ``return_text_stream`` is set; ``last_text_stream`` keeps the text stream of the last run.
    """

    def __init__(self, model_patcher, return_text_stream: bool = False):
        super().__init__(model_patcher)
        self.return_text_stream = return_text_stream
        self.last_text_stream: torch.Tensor | None = None

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        batch = noise.shape[0]

        def doubled(t):
            return None if t is None else torch.cat([t, t]) if t.shape[0] == batch else t

        def id_stream_callback(step, x0, x, total_steps):
            callback(step, x0[batch:], x[batch:], total_steps)

        out = super().sample(doubled(noise), doubled(latent_image), sampler, sigmas, doubled(denoise_mask),
                             id_stream_callback if callback is not None else None, disable_pbar, seed)
        text, ident = out[:batch], out[batch:]
        self.last_text_stream = text
        return torch.cat([ident, text]) if self.return_text_stream else ident


def id_layers(encoder, embeds, family: str) -> dict[tuple[str, int, int], IDKeysValues]:
    """Run the ID encoder once (under model management) and project its tokens for every layer."""
    comfy.model_management.load_models_gpu([encoder.patcher])
    module = encoder.encoder
    device = encoder.patcher.load_device
    if module.family != family:
        raise ValueError(f"The ID encoder {encoder.source} is for {module.family}, the model is {family}.")
    face = embeds.arcface.to(device)
    clip = None
    if module.needs_clip_vision:
        if embeds.clip_hidden is None:
            raise ValueError(f"The ID encoder {encoder.source} ({module.kind}) needs CLIP image features: connect a "
                             f"CLIP_VISION (ViT-H) to IDFuse Face Embed.")
        clip = embeds.clip_hidden.to(device)
    dtype = next(module.parameters()).dtype
    with torch.no_grad():
        positive = module.encode(face.to(dtype), None if clip is None else clip.to(dtype))
        negative = module.encode(torch.zeros_like(face, dtype=dtype), None if clip is None else torch.zeros_like(clip, dtype=dtype))
        layers = {}
        for key in block_keys(family):
            k, v = module.kv(key.key, positive)
            ku, vu = module.kv(key.key, negative)
            layers[key.key] = IDKeysValues(*(t.float().cpu() for t in (k, v, ku, vu)))
    return layers


# Inputs both Infinite-ID nodes start with (their order is part of saved workflows).
STREAM_INPUTS = {
    "model": ("MODEL", {"tooltip": "An SD1.5 or SDXL model matching the ID encoder."}),
    "positive": ("CONDITIONING", {"tooltip": "The prompt: scene, style, action. Used by both streams."}),
    "negative": ("CONDITIONING", {"tooltip": "The negative prompt, used by both streams."}),
    "id_encoder": ("ID_ENCODER", {"tooltip": "From IDFuse Load ID Encoder."}),
    "id_embeds": ("ID_EMBEDS", {"tooltip": "From IDFuse Face Embed."}),
}
CFG_INPUT = ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                       "tooltip": "Classifier-free guidance scale, applied to each stream."})

ID_INPUTS = {
    "id_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05,
                            "tooltip": "w in: cross-attention = text attention + w * ID attention (ID stream only)."}),
    "id_start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                   "tooltip": "When the ID cross-attention starts acting."}),
    "id_end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                 "tooltip": "When the ID cross-attention stops acting."}),
    "mixing": ("BOOLEAN", {"default": True, "tooltip": "Mixed self-attention: the ID stream also attends to the text "
                                                       "stream's keys/values, so it takes on the prompt's style and scene."}),
    "mix_blocks": (list(MIX_BLOCKS), {"default": "all", "tooltip": "UNet parts that use mixed self-attention. "
                                                                   "The paper does not say; all is the default."}),
    "mix_start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                    "tooltip": "When mixed self-attention starts."}),
    "mix_end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                  "tooltip": "When mixed self-attention stops."}),
    "adain": (list(ADAIN_MODES), {"default": "mean", "tooltip": "How the ID stream's keys/values are aligned with the "
                                                                "text stream's before mixing: mean (the paper's AdaIN-mean: "
                                                                "shift to the text mean, keeps identity), full (mean and "
                                                                "std), off."}),
    "encoder_lora_strength": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                        "tooltip": "Strength of the LoRA inside IP-Adapter FaceID files. Both streams "
                                                   "share the UNet's weights, so it changes the text stream too; 0 "
                                                   "keeps the text stream the plain model (Infinite-ID has no LoRA)."}),
}


def _settings(kwargs) -> InfiniteIDSettings:
    return InfiniteIDSettings(kwargs["id_weight"], kwargs["id_start_percent"], kwargs["id_end_percent"],
                              kwargs["mixing"], kwargs["mix_blocks"], kwargs["mix_start_percent"],
                              kwargs["mix_end_percent"], kwargs["adain"], kwargs["encoder_lora_strength"])


def _prepared_model(model, id_encoder, id_embeds, settings: InfiniteIDSettings):
    layers = id_layers(id_encoder, id_embeds, model_family(model))
    base = with_lora(model, id_encoder.encoder.lora, settings.lora_strength)
    return two_stream_model(base, layers, settings)


class IDFuseInfiniteIDGuider:
    DESCRIPTION = ("Infinite-ID for SamplerCustomAdvanced. Denoises two streams from the same noise in one batch: the "
                   "text stream is the plain model with the prompt (style, scene), the ID stream adds ID "
                   "cross-attention and mixed self-attention with AdaIN-mean against the text stream. The result is "
                   "the ID stream. CFG is applied to each stream with the same cfg. The input MODEL is not changed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("For SamplerCustomAdvanced: samples the ID stream (and, if asked, the text stream).",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **STREAM_INPUTS,
            "cfg": CFG_INPUT,
            **ID_INPUTS,
            "return_text_stream": ("BOOLEAN", {"default": False, "tooltip": "Also return the text stream's image "
                                                                            "(after the ID stream's, in the batch)."}),
        }}

    def build(self, model, positive, negative, id_encoder, id_embeds, cfg, return_text_stream, **kwargs):
        guider = TwoStreamGuider(_prepared_model(model, id_encoder, id_embeds, _settings(kwargs)), return_text_stream)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return (guider,)


class IDFuseInfiniteIDSampler:
    DESCRIPTION = ("Infinite-ID in one node, like KSampler: text stream and ID stream from the same noise; outputs the "
                   "ID stream's latent (the result) and the text stream's (for comparison).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("id_stream", "text_stream")
    OUTPUT_TOOLTIPS = ("The identity in the prompt's scene and style.", "The same prompt and noise without identity.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **STREAM_INPUTS,
            "latent_image": ("LATENT", {"tooltip": "Empty latent (or an image's latent with denoise < 1)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "Noise seed; both streams start from this noise."}),
            "steps": ("INT", {"default": 25, "min": 1, "max": 10000, "tooltip": "Denoising steps."}),
            "cfg": CFG_INPUT,
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "Sampling algorithm."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "Noise schedule."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Share of the schedule to run (1 = from pure noise)."}),
            **ID_INPUTS,
        }}

    def sample(self, model, positive, negative, id_encoder, id_embeds, latent_image, seed, steps, cfg, sampler_name,
               scheduler, denoise, **kwargs):
        patched = _prepared_model(model, id_encoder, id_embeds, _settings(kwargs))
        latent = comfy.sample.fix_empty_latent_channels(patched, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        sigmas = comfy.samplers.KSampler(patched, steps=steps, device=patched.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise, model_options=patched.model_options).sigmas
        guider = TwoStreamGuider(patched, return_text_stream=False)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        progress = comfy.utils.ProgressBar(max(len(sigmas) - 1, 1))

        def callback(step, _x0, _x, total_steps):
            progress.update_absolute(step + 1, total_steps)

        ident = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), sigmas,
                              latent_image.get("noise_mask"), callback, disable_pbar=True, seed=seed)
        ident = ident.to(comfy.model_management.intermediate_device())
        text = guider.last_text_stream.to(comfy.model_management.intermediate_device())
        return ({**latent_image, "samples": ident}, {**latent_image, "samples": text})


NODE_CLASS_MAPPINGS = {
    "IDFuseInfiniteIDGuider": IDFuseInfiniteIDGuider,
    "IDFuseInfiniteIDSampler": IDFuseInfiniteIDSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IDFuseInfiniteIDGuider": "IDFuse Infinite-ID Guider",
    "IDFuseInfiniteIDSampler": "IDFuse Infinite-ID Sampler",
}
