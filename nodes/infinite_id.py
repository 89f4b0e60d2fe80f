"""Infinite-ID two-stream sampling: a GUIDER for SamplerCustomAdvanced and a KSampler-style node
(the two-stream machinery is in nodes/glue/infinite_id.py)."""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils

from ..models.infinite_id.attention import ADAIN_MODES
from ..models.infinite_id.settings import MIX_BLOCKS, InfiniteIDSettings
from .glue.infinite_id import TwoStreamGuider, prepared_model

CATEGORY = "IDFuse/Infinite-ID"


# Inputs both Infinite-ID nodes start with (their order is part of saved workflows).
STREAM_INPUTS = {
    "model": ("MODEL", {"tooltip": "An SD1.5 or SDXL model matching the ID encoder."}),
    "positive": ("CONDITIONING", {"tooltip": "The prompt: scene, style, action. Used by both streams."}),
    "negative": ("CONDITIONING", {"tooltip": "The negative prompt, used by both streams."}),
    "id_encoder": ("ID_ENCODER", {"tooltip": "From IDFuse Load ID Encoder."}),
    "id_embeds": ("ID_EMBEDS", {"tooltip": "From IDFuse Face Embed (one person), Mix ID Embeds (a mix of people) or "
                                           "Combine ID Embeds (several people, each inside its mask)."}),
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

# ID inputs added after release: optional (so API prompts saved before them still validate; ComfyUI passes the
# default where a workflow has none) and at the very end of both nodes' inputs.
ID_OPTIONAL_INPUTS = {
    # The reference's s_scale (ComfyUI IP-Adapter pack: weight_faceidv2, same default and range).
    "s_scale": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05,
                          "tooltip": "IP-Adapter FaceID-PlusV2 only (other encoders ignore it): the weight of the "
                                     "CLIP branch added to the face tokens (the reference's s_scale; weight_faceidv2 "
                                     "in the IP-Adapter pack). Higher follows the photo's face structure more."}),
}


def _settings(kwargs) -> InfiniteIDSettings:
    return InfiniteIDSettings(kwargs["id_weight"], kwargs["id_start_percent"], kwargs["id_end_percent"],
                              kwargs["mixing"], kwargs["mix_blocks"], kwargs["mix_start_percent"],
                              kwargs["mix_end_percent"], kwargs["adain"], kwargs["encoder_lora_strength"],
                              kwargs.get("s_scale", InfiniteIDSettings.shortcut_scale))


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
        }, "optional": {**ID_OPTIONAL_INPUTS}}

    def build(self, model, positive, negative, id_encoder, id_embeds, cfg, return_text_stream, **kwargs):
        guider = TwoStreamGuider(prepared_model(model, id_encoder, id_embeds, _settings(kwargs)), return_text_stream)
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
        }, "optional": {**ID_OPTIONAL_INPUTS}}

    def sample(self, model, positive, negative, id_encoder, id_embeds, latent_image, seed, steps, cfg, sampler_name,
               scheduler, denoise, **kwargs):
        patched = prepared_model(model, id_encoder, id_embeds, _settings(kwargs))
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
