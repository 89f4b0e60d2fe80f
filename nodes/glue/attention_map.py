"""IDFuse Attention Map on a ComfyUI model: the words' positions (CLIP's tokenizer), the model wrapper that
adds the recording patch to every model call, and the heat maps and face shares afterwards.

The recording needs what only a model call knows (its noise level, which chunks are positive, whether
Infinite-ID runs two streams, the patches every later node added), so it is not one static patch: a
``model_function_wrapper`` looks at each call's transformer options and, inside the recorded window,
appends a ``WordAttentionProbe`` for that call as the LAST ``attn2_patch``. Replace patches stay as they are
(Infinite-ID's, any other pack's); an earlier model wrapper is called in turn.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ...models.attention_maps.layers import layers_of
from ...models.attention_maps.record import AttentionRecord
from ...models.attention_maps.recorder import LayerProjections, WordAttentionProbe, recorded_rows
from ...models.attention_maps.render import box_share, draw_labels, heat_overlay, normalised, share_table
from ...models.attention_maps.words import WordPositions, parse_words, word_positions
from ...models.errors import IDFuseInputError
from ...models.faces import as_face_detector
from ...models.faces.images import rgb_photos, to_uint8
from ...models.unet import cross_attention_path
from .id_encoding import applied_identity_prompts
from .model_info import TOKENIZER_KEYS, clip_family, model_family
from .sampling import sigma_range

log = logging.getLogger("idfuse.nodes")


# --- words ---


def _token_ids(tokens: dict, key: str) -> list[list[object]]:
    return [[entry[0] for entry in chunk] for chunk in tokens[key]]


def placeholder_words(model) -> list[str]:
    """The placeholder words of the identity prompts the model's IDFuse Apply ID Tokens patches apply."""
    words: list[str] = []
    for prompt in applied_identity_prompts(model):
        for word in getattr(prompt, "placeholders", None) or (prompt.placeholder,):
            if word not in words:
                words.append(word)
    return words


def prompt_words(clip, text: str, words_text: str, model) -> tuple[tuple[WordPositions, ...], int]:
    """The chosen words located in the prompt ``text`` as CLIP tokenizes it, and the prompt's context length.
    Empty ``words_text``: the identity placeholders applied to ``model``."""
    if clip is None:
        raise IDFuseInputError("The clip input is None: the checkpoint has no text encoder. Connect the CLIP that "
                               "encodes the positive prompt.")
    words = parse_words(words_text)
    if not words:
        words = placeholder_words(model)
        if not words:
            raise IDFuseInputError("words is empty and the model applies no identity tokens, so there is no "
                                   "placeholder to map: write the words to map, separated by commas (e.g. "
                                   "'woman, hat'), or connect the MODEL of IDFuse Apply ID Tokens.")
    tokens = clip.tokenize(text)
    key = next(iter(TOKENIZER_KEYS[clip_family(tokens)]))  # every family's tokenizers share positions
    prompt = _token_ids(tokens, key)
    framing = {i for chunk in _token_ids(clip.tokenize(""), key) for i in chunk}  # start, end, padding
    ids = [(word, [i for chunk in _token_ids(clip.tokenize(word), key) for i in chunk if i not in framing])
           for word in words]
    return word_positions(prompt, ids), sum(len(chunk) for chunk in prompt)


# --- recording ---


def layer_projections(model, layers) -> dict[tuple[str, int, int], LayerProjections]:
    unet = model.model.diffusion_model
    found = {}
    for key in layers:
        attention = unet.get_submodule(cross_attention_path(unet, key))
        found[key.key] = LayerProjections(key, attention.to_q, attention.to_k)
    return found


def runs_two_streams(transformer_options: dict) -> bool:
    """Whether this call's cross-attention replace patches run Infinite-ID's two streams (text rows, then ID)."""
    replaced = transformer_options.get("patches_replace", {}).get("attn2", {})
    return any(getattr(patch, "two_streams", False) for patch in replaced.values())


def with_last_attn2_patch(transformer_options: dict, patch) -> dict:
    """A copy of the call's transformer options with ``patch`` after every other attn2_patch (nothing shared
    is changed)."""
    patches = dict(transformer_options.get("patches", {}))
    patches["attn2_patch"] = [*patches.get("attn2_patch", []), patch]
    return {**transformer_options, "patches": patches}


class AttentionMapWrapper:
    """ComfyUI ``model_function_wrapper``: records the words' attention of the positive rows of each call inside
    the record's window, then runs the call (through the wrapper it replaced, if any). Shared by clones."""

    def __init__(self, record: AttentionRecord, layers: dict[tuple[str, int, int], LayerProjections], inner=None):
        self.record = record
        self.layers = layers
        self.inner = inner

    def __deepcopy__(self, memo):
        return self

    def __call__(self, apply_model, args: dict):
        c = args["c"]
        options = c.get("transformer_options", {})
        sigmas = options.get("sigmas", args["timestep"])
        sigma = float(sigmas.reshape(-1)[0])
        if self.record.begin_call(sigma):
            rows = recorded_rows(args["cond_or_uncond"], args["input"].shape[0], 2 if runs_two_streams(options) else 1)
            if rows is not None:
                probe = WordAttentionProbe(self.record, self.layers, rows, sigma)
                args = {**args, "c": {**c, "transformer_options": with_last_attn2_patch(options, probe)}}
        if self.inner is not None:
            return self.inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])


def with_attention_map(model, clip, text: str, words: str, layers: str, start_percent: float,
                       end_percent: float):
    """A clone of ``model`` that records the words' attention, and the record it fills."""
    family = model_family(model)
    located, prompt_length = prompt_words(clip, text, words, model)
    keys = layers_of(family, layers)
    sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
    record = AttentionRecord(located, prompt_length, keys, sigma_start, sigma_end)
    patched = model.clone()
    inner = patched.model_options.get("model_function_wrapper")
    patched.set_model_unet_function_wrapper(AttentionMapWrapper(record, layer_projections(model, keys), inner))
    log.info("Attention map: %s at %d layers (%s), %.0f%%-%.0f%% of the sampling", ", ".join(
        w.word for w in located), len(keys), layers, 100 * start_percent, 100 * end_percent)
    return patched, record


# --- showing ---


def show_attention(record: AttentionRecord, images: torch.Tensor, face_analysis=None,
                   opacity: float = 0.6) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Heat maps (IMAGE, word-major: every image for the first word, then the next), the maps as MASKs (each
    scaled to its peak) and the table of shares inside each face box."""
    if not isinstance(record, AttentionRecord):
        raise IDFuseInputError(f"attention_record is a {type(record).__name__}; connect the attention_record "
                               f"output of IDFuse Attention Map.")
    photos = rgb_photos(images, "images")
    batch = images if images.ndim == 4 else images[None]
    height, width = batch.shape[1:3]
    maps = record.maps((height, width))[record.rows_for_images(len(photos))]  # (images, words, H, W)
    detector = None if face_analysis is None else as_face_detector(face_analysis)
    faces = [None if detector is None else detector.detect(photo) for photo in photos]
    words = [w.word for w in record.words]
    heat, masks = [], []
    shares: list[list[list[float]]] = []
    for index, word in enumerate(words):
        for image in range(len(photos)):
            attention = maps[image, index]
            boxes = faces[image].boxes if faces[image] is not None else np.zeros((0, 4), dtype=np.float32)
            word_shares = [box_share(attention, tuple(float(v) for v in box)) for box in boxes]
            overlay = to_uint8(heat_overlay(batch[image].cpu(), attention, opacity))
            heat.append(torch.from_numpy(draw_labels(overlay, word, boxes, word_shares)))
            masks.append(normalised(attention))
            if index == 0:
                shares.append([])
            shares[image].append(word_shares)
    table = (share_table(words, shares, record.describe()) if detector is not None
             else f"No face analysis connected: no face shares ({record.describe()}).")
    log.info("Attention map shown: %s", record.describe())
    return torch.stack(heat).float() / 255.0, torch.stack(masks), table
