"""One step of identity-enhanced training of an ID encoder (Infinite-ID; docs/METHOD.md §2.9), against a frozen UNet.

A reference photo and a different target photo of the same person: the encoder turns the reference's face
embedding (and CLIP features) into ID tokens, each cross-attention layer projects them to its ID keys and
values, and the frozen UNet denoises the noisy target with

  text_attention off (the paper):  Attn(Q, K_id, V_id)                     the text attention is never computed
  text_attention on (comparison):  Attn(Q, K_text, V_text) + Attn(Q, K_id, V_id)

The loss is the diffusion loss in the model's own parameterisation (``loop.diffusion_loss``), optionally
Min-SNR weighted. The host (``nodes/glue/encoder_training.py`` for ComfyUI's UNet) gives the frozen UNet as a
``Denoiser`` callable and installs ``IDTrainingAttention`` in its cross-attention layers.

Every random draw of a sample (timestep, noise, whether its ID input is dropped) comes from a generator seeded
with (seed, step, the sample's global index in the step), so a step draws the same whatever the number of
processes the global batch is split over, and a resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ..encoders.modules import IDEncoder
from ..errors import TrainingError
from ..unet import block_keys
from .encoder_settings import EncoderTrainingSettings
from .loop import autocast, diffusion_loss, min_snr_weight

log = logging.getLogger("idfuse.training")

LayerKey = tuple[str, int, int]  # (block, block_id, index) of a cross-attention layer (models.unet.BlockKey.key)
IDKeysValuesByLayer = Mapping[LayerKey, tuple[torch.Tensor, torch.Tensor]]  # layer -> (K_id, V_id), (B, T, inner)
Attention = Callable[..., torch.Tensor]  # ComfyUI's optimized_attention(q, k, v, heads, ...)

# Key of the per-layer ID keys/values in ComfyUI's transformer_options (read by IDTrainingAttention).
ID_KEYS_VALUES = "idfuse_training_id_keys_values"
AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Denoiser(Protocol):
    """The frozen UNet as the step sees it (``nodes.glue.encoder_training.TrainingDenoiser`` for ComfyUI)."""

    model_sampling: nn.Module  # ComfyUI's sampling object: sigma(t), noise_scaling, calculate_denoised, sigmas

    def __call__(self, x_noisy: torch.Tensor, sigma: torch.Tensor, id_kv: IDKeysValuesByLayer,
                 prompts_context: torch.Tensor | None, prompts_pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The model's x0 prediction (B, C, h, w). ``prompts_context`` is None with text attention off."""
        ...


@dataclass
class PairBatch:
    """One process's share of a step: B (reference photo, different target photo) pairs of the same people."""

    sample_ids: torch.Tensor  # int64 (B,): each sample's GLOBAL index in the step (its draws depend on it)
    reference_faces: torch.Tensor  # (B, D) face embeddings of the reference photos
    reference_clip: torch.Tensor | None  # (B, 257, 1280) CLIP vision penultimate features, or None
    target_latents: torch.Tensor  # (B, C, h, w) the target photos' latents, VAE-encoded and scaled (process_latent_in)
    prompts_context: torch.Tensor | None = None  # (B, 77k, ctx) text context; read only with text_attention "on"
    prompts_pooled: torch.Tensor | None = None  # (B, 1280) SDXL's pooled text; "on" only (None: zeros)

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])

    def to(self, device: torch.device | str) -> PairBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{n: None if t is None else t.to(device) for n, t in moved.items()})


@dataclass(frozen=True)
class SampleDraws:
    """What a step draws for its samples."""

    timesteps: torch.Tensor  # int64 (B,) on the model's discrete training schedule
    noise: torch.Tensor  # (B, C, h, w)
    dropped: torch.Tensor  # bool (B,): the sample's ID input is replaced by the negative input


def sample_generator(seed: int, step: int, sample_id: int) -> np.random.Generator:
    """The random source of sample ``sample_id`` (global index) at ``step``: numpy's SeedSequence of the three,
    distinct for every (seed, step, sample). Not ``loop.step_generator``: torch's CPU generator keeps only 32 bits
    of its seed, so (step, sample) pairs of a long run on many processes would share draws."""
    return np.random.default_rng(np.random.SeedSequence([seed, step, sample_id]))


def draw_samples(seed: int, step: int, sample_ids: torch.Tensor, latent_shape: tuple[int, ...], num_timesteps: int,
                 id_dropout: float) -> SampleDraws:
    """Each sample's timestep, ID dropout and noise, from its own generator (in that order), on the CPU."""
    timesteps, dropped, noise = [], [], []
    for sample_id in sample_ids.tolist():
        rng = sample_generator(seed, step, int(sample_id))
        timesteps.append(int(rng.integers(0, num_timesteps)))
        dropped.append(bool(rng.random() < id_dropout))
        noise.append(torch.from_numpy(rng.standard_normal(latent_shape, dtype=np.float32)))
    return SampleDraws(torch.tensor(timesteps, dtype=torch.long), torch.stack(noise), torch.tensor(dropped))


class IDTrainingAttention:
    """ComfyUI ``attn2_replace`` of every cross-attention layer during training: Attn(Q, K_id, V_id), plus
    Attn(Q, K_text, V_text) when ``text_attention`` (the layer's text keys/values ``k``, ``v``).

    The ID keys/values of the layer come per call from ``transformer_options[ID_KEYS_VALUES]`` (one row per
    sample). With text attention off the text keys/values are never attended to (the host gives the UNet a
    1-token zero context, so projecting it costs nothing). Stateless: clones share it.
    """

    def __init__(self, attention: Attention, text_attention: bool):
        self.attention = attention
        self.text_attention = text_attention

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        id_kv = extra_options.get(ID_KEYS_VALUES)
        if id_kv is None:
            raise TrainingError("The training model's ID cross-attention got no ID keys/values: it may only run "
                                "through the training denoiser; use the original MODEL for anything else.")
        heads = extra_options["n_heads"]
        kwargs = {"attn_precision": extra_options.get("attn_precision")}
        k_id, v_id = id_kv[(*extra_options["block"], extra_options["block_index"])]
        # The frozen UNet may compute in float16 while the ID projections are float32.
        out = self.attention(q, k_id.to(q.dtype), v_id.to(q.dtype), heads, **kwargs)
        if self.text_attention:
            out = self.attention(q, k, v, heads, **kwargs) + out
        return out


class EncoderTraining(nn.Module):
    """The trainable module of identity-enhanced training.

    Registers ONLY the IDEncoder as a submodule (``self.encoder``), so DDP/accelerate syncs exactly its
    parameters; the frozen UNet is reached through ``denoiser`` (not a submodule). ``clip_uncond``: CLIP
    features of the unconditional image (1, 257, 1280), the negative CLIP input of dropped samples (as
    IDFuse Face Embed computes it for inference); needed when the encoder reads CLIP features.
    """

    def __init__(self, encoder: IDEncoder, denoiser: Denoiser, settings: EncoderTrainingSettings,
                 clip_uncond: torch.Tensor | None):
        super().__init__()
        if encoder.needs_clip_vision and clip_uncond is None:
            raise TrainingError(f"ID encoder {encoder.source} reads CLIP features, so training needs the CLIP "
                                f"features of the unconditional image (clip_uncond) for the samples whose ID "
                                f"input is dropped; compute them with the same CLIP vision model as the data.")
        self.encoder = encoder
        self.settings = settings
        object.__setattr__(self, "denoiser", denoiser)  # never a registered submodule, even if it is a Module
        self.clip_uncond = None if clip_uncond is None else clip_uncond.detach().float()
        self.layer_keys = [key.key for key in block_keys(encoder.family)]
        # What trains: the face mapper, every layer's ID K/V, the CLIP mapper unless told otherwise.
        encoder.requires_grad_(True)
        if encoder.clip_mapper is not None and not settings.train_clip_mapper:
            encoder.clip_mapper.requires_grad_(False)
        sampling = denoiser.model_sampling
        self.num_timesteps = int(sampling.sigmas.shape[0])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def draw(self, batch: PairBatch, step: int) -> SampleDraws:
        return draw_samples(self.settings.seed, step, batch.sample_ids.cpu(), tuple(batch.target_latents.shape[1:]),
                            self.num_timesteps, self.settings.id_dropout)

    def id_inputs(self, batch: PairBatch, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder's inputs: the reference's face embedding and CLIP features, or for dropped samples the
        negative input (zero face embedding, the unconditional image's CLIP features)."""
        faces = batch.reference_faces
        keep = (~dropped).to(faces.device)
        faces = torch.where(keep.view(-1, 1), faces, torch.zeros_like(faces))
        clip = batch.reference_clip
        if not self.encoder.needs_clip_vision:
            return faces, None
        if clip is None:
            raise TrainingError(f"ID encoder {self.encoder.source} reads CLIP features, but the batch has none "
                                f"(reference_clip): prepare the data with a CLIP vision model.")
        uncond = self.clip_uncond.to(clip.device, clip.dtype).expand_as(clip)
        return faces, torch.where(keep.view(-1, 1, 1), clip, uncond)

    def id_keys_values(self, faces: torch.Tensor, clip: torch.Tensor | None) -> dict[LayerKey, tuple]:
        tokens = self.encoder.encode(faces, clip)
        return {key: self.encoder.kv(key, tokens) for key in self.layer_keys}

    def forward(self, batch: PairBatch, step: int) -> torch.Tensor:
        """The scalar diffusion loss of the batch (the mean over its samples) at optimiser step ``step``."""
        s = self.settings
        x0 = batch.target_latents
        device = x0.device
        draws = self.draw(batch, step)
        context = pooled = None
        if s.text_attention_on:
            if batch.prompts_context is None:
                raise TrainingError("text_attention is on, but the batch has no prompts_context: give each sample's "
                                    "encoded prompt, or set text_attention off (the paper's training).")
            context, pooled = batch.prompts_context, batch.prompts_pooled
        sampling = self.denoiser.model_sampling
        sigma = sampling.sigma(draws.timesteps.float().to(sampling.sigmas.device)).to(device)
        x_noisy = sampling.noise_scaling(sigma.view(-1, 1, 1, 1), draws.noise.to(device, x0.dtype), x0)
        with autocast(device, AUTOCAST_DTYPES[s.mixed_precision]):
            id_kv = self.id_keys_values(*self.id_inputs(batch, draws.dropped))
            x0_pred = self.denoiser(x_noisy, sigma, id_kv, context, pooled)
        weight = None
        if s.min_snr_gamma > 0:
            weight = min_snr_weight(sampling, draws.timesteps, s.min_snr_gamma).to(device)
        loss = diffusion_loss(sampling, sigma, x0_pred, x0, weight)
        if log.isEnabledFor(logging.DEBUG):  # reading the loss waits for the GPU: only when it is logged
            log.debug("step %d: %d samples (%d ID-dropped), loss %.5f", step, len(batch), int(draws.dropped.sum()),
                      float(loss.detach()))
        return loss


class EncoderEMA:
    """Exponential moving average of the encoder's trainable weights:
    shadow ← decay · shadow + (1 − decay) · weight after each optimiser step, in float32.

    ``state_dict``/``load_state_dict`` for resuming (accelerate's ``register_for_checkpointing``); ``copy_to``
    writes the average into an encoder for export (copy the encoder first to keep training it).
    """

    def __init__(self, encoder: IDEncoder, decay: float):
        if not 0.0 < decay < 1.0:
            raise TrainingError(f"ema_decay {decay} must be between 0 and 1 (0 = no EMA, then make no EncoderEMA).")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in encoder.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, encoder: IDEncoder) -> None:
        params = dict(encoder.named_parameters())
        for name, average in self.shadow.items():
            weight = params[name].detach()
            average.mul_(self.decay).add_(weight.to(average.device, torch.float32), alpha=1.0 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, encoder: IDEncoder) -> None:
        params = dict(encoder.named_parameters())
        for name, average in self.shadow.items():
            params[name].copy_(average.to(params[name].device, params[name].dtype))

    def to(self, device: torch.device | str) -> EncoderEMA:
        self.shadow = {name: t.to(device) for name, t in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {name: t.detach().cpu().clone() for name, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise TrainingError("The saved EMA holds other weights than this encoder trains (train_clip_mapper or "
                                "the encoder differ from the run being resumed); resume with the same settings.")
        if float(state["decay"]) != self.decay:
            raise TrainingError(f"The saved EMA has decay {state['decay']}, this run {self.decay}; resume with the "
                                f"same ema_decay.")
        self.updates = int(state["updates"])
        self.shadow = {name: state["shadow"][name].to(self.shadow[name].device, torch.float32).clone()
                       for name in self.shadow}
