"""Two-stream sampling on a ComfyUI model: the patched clone, the doubled-batch guider and the
ID encoder's per-layer keys/values.

Both streams start from the same noise and are denoised in one batched UNet pass: the batch
is doubled (text stream rows, then ID stream rows) and the attention patches of
``models.infinite_id`` act on the ID rows only. Classifier-free guidance is applied to each
stream separately with the same cfg: each stream has its own positive and negative rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import comfy.samplers
import torch
from comfy.ldm.modules.attention import optimized_attention

from ...models.errors import IDEncoderError, IDFuseInputError
from ...models.infinite_id.attention import (
    IDCrossAttention,
    IDKeysValues,
    MixedSelfAttention,
    RegionMasks,
    SigmaWindow,
)
from ...models.infinite_id.identities import RegionalIdentities, TokenMix
from ...models.infinite_id.settings import MIX_BLOCKS, InfiniteIDSettings
from ...models.unet import FAMILY_NAMES, block_keys
from .id_encoders import load_fully
from .lora import with_lora
from .model_info import PERCENT_WINDOWS, check_model_sampling, cross_attention_widths, model_family
from .sampling import sigma_range
from .shared_noise import with_shared_noise

LayerKeysValues = dict[tuple[str, int, int], IDKeysValues]


def two_stream_model(model, layers: LayerKeysValues | Sequence[LayerKeysValues], settings: InfiniteIDSettings,
                     masks: RegionMasks | None = None):
    """A clone of ``model`` whose attention runs the ID stream on the second half of each chunk.

    ``layers``: one identity's keys/values per layer, or one such mapping per identity with their ``masks``
    (regional Infinite-ID: still one ID stream)."""
    family = model_family(model)
    check_model_sampling(model, "IDFuse Infinite-ID Guider / Sampler", PERCENT_WINDOWS)
    keys = block_keys(family)
    widths = cross_attention_widths(model)
    for identity in [layers] if isinstance(layers, Mapping) else layers:
        missing = [str(k) for k in keys if k.key not in identity]
        if missing:
            raise IDEncoderError(f"The ID encoder has no ID keys/values for layers {missing[:4]} ({len(missing)} of "
                                 f"{len(keys)}) of this {FAMILY_NAMES[family]} model; use an encoder made for "
                                 f"{FAMILY_NAMES[family]}.")
        wrong = [f"{key}: {identity[key].k_cond.shape[-1]} != {width}" for key, width in widths.items()
                 if identity[key].k_cond.shape[-1] != width]
        if wrong:
            raise IDEncoderError(f"The ID encoder's keys/values do not fit this model's cross-attention widths "
                                 f"({', '.join(wrong[:3])}); use an encoder made for this model.")
    id_window = SigmaWindow(*sigma_range(model, settings.id_start, settings.id_end,
                                         "id_start_percent", "id_end_percent"))
    mix_window = SigmaWindow(*sigma_range(model, settings.mix_start, settings.mix_end,
                                          "mix_start_percent", "mix_end_percent"))
    patched = model.clone()
    cross = IDCrossAttention(optimized_attention, layers, settings.id_weight, id_window, masks=masks)
    mixed = MixedSelfAttention(optimized_attention, settings.adain, mix_window, masks)
    for key in keys:
        patched.set_model_attn2_replace(cross, *key.key)
        if settings.mixing and key.block in MIX_BLOCKS[settings.mix_blocks]:
            patched.set_model_attn1_replace(mixed, *key.key)
    return patched


class TwoStreamGuider(comfy.samplers.CFGGuider):
    """CFG guider that denoises a text stream and an ID stream from the same noise in one batch.

    Both streams also get the same per-step noise from any KSAMPLER (``shared_noise``), the text
    stream's being what a plain sampling of its rows draws. ``sample`` returns the ID stream, or both
    streams concatenated (ID first) when ``return_text_stream`` is set; ``last_text_stream`` keeps the
    text stream of the last run.
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

        shared_noise_sampler = with_shared_noise(sampler)
        out = super().sample(doubled(noise), doubled(latent_image), shared_noise_sampler, sigmas, doubled(denoise_mask),
                             id_stream_callback if callback is not None else None, disable_pbar, seed)
        text, ident = out[:batch], out[batch:]
        self.last_text_stream = text
        return torch.cat([ident, text]) if self.return_text_stream else ident


def _identity_tokens(encoder, embeds, shortcut_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive and negative ID tokens of one face (checked against the encoder)."""
    module = encoder.encoder
    # ID_EMBEDS made by other code than IDFuse Face Embed may not name their space: then it cannot be checked.
    module.check_face_embedding(getattr(embeds, "embedding_space", None), embeds.arcface.shape[-1],
                                getattr(embeds, "backend", ""))
    clip = clip_uncond = None
    if module.needs_clip_vision:
        clip = embeds.clip_hidden
        clip_uncond = getattr(embeds, "clip_hidden_uncond", None)
        if clip is None:
            raise IDEncoderError(f"The ID encoder {encoder.source} ({module.kind}) needs CLIP image features, which "
                                 f"id_embeds lacks: connect a CLIP_VISION (ViT-H) to clip_vision of IDFuse Face "
                                 f"Embed.")
        if clip_uncond is None:
            raise IDEncoderError(f"The ID encoder {encoder.source} ({module.kind}) needs the CLIP features of the "
                                 f"unconditional image for its negative, which id_embeds lacks: make id_embeds with "
                                 f"IDFuse Face Embed (clip_vision connected).")
    face = embeds.arcface
    positive = module.encode(face, clip, shortcut_scale=shortcut_scale)
    negative = module.encode(torch.zeros_like(face), clip_uncond, shortcut_scale=shortcut_scale)
    return positive, negative


def id_layers(encoder, embeds, family: str, shortcut_scale: float = 1.0) -> dict[tuple[str, int, int], IDKeysValues]:
    """Run the ID encoder once (loaded whole through model management) and project its tokens for every layer.

    The negative tokens are what the reference builds for classifier-free guidance: a zero face embedding and,
    for encoders with a CLIP mapper, the CLIP features of the unconditional image that IDFuse Face Embed
    computed (``FaceEmbedding.clip_hidden_uncond``). ``shortcut_scale``: FaceID-PlusV2's s_scale.
    A ``TokenMix`` (IDFuse Mix ID Embeds, tokens): each face is encoded and the tokens (positive and negative)
    are mixed with its weights; the projections are linear, so this mixes the keys/values as well.
    """
    module = encoder.encoder
    if module.family != family:
        raise IDEncoderError(f"The ID encoder {encoder.source} is for {module.family}, the model is {family}. Load "
                             f"an encoder made for {FAMILY_NAMES[family]}, or a "
                             f"{FAMILY_NAMES.get(module.family, module.family)} checkpoint.")
    load_fully(encoder)
    with torch.no_grad():
        if isinstance(embeds, TokenMix):
            encoded = [_identity_tokens(encoder, face, shortcut_scale) for face in embeds.faces]
            positive = sum(w * pos for w, (pos, _) in zip(embeds.weights, encoded, strict=True))
            negative = sum(w * neg for w, (_, neg) in zip(embeds.weights, encoded, strict=True))
        else:
            positive, negative = _identity_tokens(encoder, embeds, shortcut_scale)
        layers = {}
        for key in block_keys(family):
            k, v = module.kv(key.key, positive)
            ku, vu = module.kv(key.key, negative)
            layers[key.key] = IDKeysValues(*(t.float().cpu() for t in (k, v, ku, vu)))
    return layers


def prepared_model(model, id_encoder, id_embeds, settings: InfiniteIDSettings):
    """The two-stream clone for one identity (a FaceEmbedding or a TokenMix) or a regional set of them."""
    family = model_family(model)
    masks = None
    if isinstance(id_embeds, RegionalIdentities):
        layers = [id_layers(id_encoder, region.identity, family, settings.shortcut_scale)
                  for region in id_embeds.regions]
        masks = RegionMasks(id_embeds.masks)
    else:
        if not hasattr(id_embeds, "arcface") and not isinstance(id_embeds, TokenMix):
            raise IDFuseInputError(f"id_embeds is a {type(id_embeds).__name__}, not an ID_EMBEDS; connect IDFuse "
                                   f"Face Embed, Mix ID Embeds or Combine ID Embeds.")
        layers = id_layers(id_encoder, id_embeds, family, settings.shortcut_scale)
    id_encoder.encoder.check_layer_widths(cross_attention_widths(model))
    base = with_lora(model, id_encoder.encoder.lora, settings.lora_strength)
    return two_stream_model(base, layers, settings, masks)
