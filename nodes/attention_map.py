"""IDFuse Attention Map and IDFuse Show Attention Map: where prompt words (each identity placeholder by default)
attend during sampling, as heat maps over the decoded picture (models/attention_maps)."""

from __future__ import annotations

import torch

from ..models.attention_maps.layers import DEFAULT_LAYER_SET, LAYER_SETS
from ..models.attention_maps.record import AttentionRecord
from .glue.attention_map import show_attention, with_attention_map

CATEGORY = "IDFuse/attention maps"

# The middle of the schedule: the first steps (nearly pure noise) give diffuse maps before the layout forms,
# the last ones refine texture and spread the attention; in between each word's region is settled.
DEFAULT_START_PERCENT = 0.3
DEFAULT_END_PERCENT = 0.7


class IDFuseAttentionMap:
    DESCRIPTION = ("Records, while the returned MODEL samples, where chosen prompt words attend: their "
                   "cross-attention probability at the chosen layers and steps, averaged over heads, layers and "
                   "steps, reduced on the fly. The sampled image is unchanged; the layers' own attention (fast "
                   "kernels, IDFuse token or Infinite-ID patches) still runs. Put it last, right before the "
                   "sampler or Infinite-ID guider, and connect attention_record to IDFuse Show Attention Map "
                   "with the decoded image.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "ATTENTION_RECORD")
    RETURN_NAMES = ("model", "attention_record")
    OUTPUT_TOOLTIPS = (
        "The model, recording during sampling (sample with it).",
        "What the sampling records, for IDFuse Show Attention Map. Each sampling run replaces the previous one.",
    )
    FUNCTION = "record"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD1.5 or SDXL model the sampler uses, with every patch it needs "
                                           "(e.g. from IDFuse Apply ID Tokens)."}),
            "clip": ("CLIP", {"tooltip": "The CLIP that encodes the positive prompt: its tokenizer finds the words' "
                                         "positions."}),
            "text": ("STRING", {"multiline": True,
                                "tooltip": "The positive prompt, exactly as in its prompt node (turn that node's "
                                           "text into an input and link both to one text node to keep them equal)."}),
            "words": ("STRING", {"default": "",
                                 "tooltip": "Words of the prompt to map, separated by commas (a word of several "
                                            "tokens sums them). Empty: each identity placeholder the model applies "
                                            "(IDFuse Apply ID Tokens)."}),
            "layers": (list(LAYER_SETS), {
                "default": DEFAULT_LAYER_SET,
                "tooltip": "Cross-attention layers averaged: mid-resolution (the 16x16 grid of SD1.5 at 512 px, 32x32 "
                           "of SDXL at 1024 px: one region per word, cheap), trained layers (where the identity "
                           "trainer's attention loss acts), or all."}),
            "start_percent": ("FLOAT", {"default": DEFAULT_START_PERCENT, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Share of the sampling at which recording starts."}),
            "end_percent": ("FLOAT", {"default": DEFAULT_END_PERCENT, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Share of the sampling after which recording stops."}),
        }}

    def record(self, model, clip, text: str, words: str, layers: str, start_percent: float, end_percent: float):
        return with_attention_map(model, clip, text, words, layers, start_percent, end_percent)


class IDFuseShowAttentionMap:
    DESCRIPTION = ("Draws what IDFuse Attention Map recorded as one heat map per word over each decoded image "
                   "(red = where the word attends most), and with a face analysis connected gives each word's "
                   "share of attention inside every face box (faces counted left to right): with two identities, "
                   "each placeholder should own its face.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("heatmaps", "maps", "shares")
    OUTPUT_TOOLTIPS = (
        "One heat map per word and image (every image for the first word, then the next word), the word written "
        "on it, face boxes with the word's share.",
        "The same maps as MASKs, each scaled to its peak (1 = the word's strongest attention).",
        "A text table: per image and word, the share of the word's attention inside each face box.",
    )
    FUNCTION = "show"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "attention_record": ("ATTENTION_RECORD", {"tooltip": "From IDFuse Attention Map, after sampling."}),
                "images": ("IMAGE", {"tooltip": "The decoded images of that sampling (VAE Decode of its latent)."}),
                "opacity": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.05,
                                      "tooltip": "How strongly the heat colours cover the image (0 = the image)."}),
            },
            "optional": {
                "face_analysis": ("FACE_ANALYSIS", {
                    "tooltip": "From IDFuse Load Face Analysis: finds the faces whose boxes get each word's share."}),
            },
        }

    def show(self, attention_record: AttentionRecord, images: torch.Tensor, opacity: float, face_analysis=None):
        return show_attention(attention_record, images, face_analysis, opacity)


NODE_CLASS_MAPPINGS = {
    "IDFuseAttentionMap": IDFuseAttentionMap,
    "IDFuseShowAttentionMap": IDFuseShowAttentionMap,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IDFuseAttentionMap": "IDFuse Attention Map",
    "IDFuseShowAttentionMap": "IDFuse Show Attention Map",
}
