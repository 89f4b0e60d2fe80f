"""ComfyUI's side of ID-encoder training: a checkpoint loaded by ComfyUI's own loader, its frozen UNet as the
training denoiser (ID cross-attention in every cross-attention layer of a clone, through ComfyUI's
``apply_model``), and VAE encoding of the training crops.

The step itself is plain torch (``models.training.encoder_trainer``). Use::

    model, clip, vae = checkpoint_models(path)
    denoiser = training_denoiser(model, settings, device)
    encoder = create_idfuse_encoder(denoiser.family, denoiser.hidden_sizes).to(device)
    with denoiser:  # loads the UNet, freezes it and makes it trainable-through; undone on exit
        loss = EncoderTraining(encoder, denoiser, settings, clip_uncond)(batch, step)
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

import comfy.model_management
import comfy.sd
import torch
from comfy.ldm.modules.attention import optimized_attention

from ...models.errors import TrainingError
from ...models.training.encoder_settings import EncoderTrainingSettings
from ...models.training.encoder_trainer import ID_KEYS_VALUES, IDKeysValuesByLayer, IDTrainingAttention
from ...models.training.frozen import autograd_safe_residuals, frozen, gradient_checkpointing, without_inference_tensors
from ...models.unet import CONTEXT_DIM, block_keys
from .model_info import TRAINING_TIMESTEPS, check_model_sampling, cross_attention_widths, model_family
from .training_models import Precision, model_extra_conds, training_precision

log = logging.getLogger("idfuse.nodes")

NODE_NAME = "IDFuse ID-encoder training"
LATENT_FACTOR = 8  # SD1.5/SDXL VAEs: pixels per latent cell
POOLED_WIDTH = 1280  # SDXL's pooled text embedding (CLIP-G's projection)


class TrainingDenoiser:
    """The frozen UNet of a ComfyUI MODEL as ``models.training.encoder_trainer.Denoiser``: x0 prediction of
    ``(x_noisy, sigma, id_kv, prompts_context[, prompts_pooled])`` through ComfyUI's ``apply_model``.

    Works on a clone carrying ``IDTrainingAttention`` as ``attn2_replace`` on every cross-attention layer (the
    MODEL given keeps its options). Use inside ``with denoiser:``, which loads the UNet (fully, on ``device``),
    swaps its inference-mode weights for aliases, freezes them, makes in-place residuals autograd-safe and
    optionally checkpoints its layers; everything is undone on exit. ``family`` and ``hidden_sizes`` are what
    ``create_idfuse_encoder`` takes; ``precision`` says whether the UNet computes in float16 (scale the loss).
    """

    def __init__(self, model_patcher, settings: EncoderTrainingSettings, device: torch.device | None = None):
        check_model_sampling(model_patcher, NODE_NAME, TRAINING_TIMESTEPS)
        self.settings = settings
        self.family = model_family(model_patcher)
        self.hidden_sizes: dict[tuple[str, int, int], int] = cross_attention_widths(model_patcher)
        self.context_dim = CONTEXT_DIM[self.family]
        patched = model_patcher.clone()
        if device is not None:
            patched.load_device = torch.device(device)
        self.device = torch.device(patched.load_device)
        replaced = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        if replaced:
            log.warning("The model already replaces %d cross-attention layers (another pack's patch); encoder "
                        "training puts its ID cross-attention in their place.", len(replaced))
        self.id_attention = IDTrainingAttention(optimized_attention, settings.text_attention_on)
        for key in block_keys(self.family):
            patched.set_model_attn2_replace(self.id_attention, *key.key)
        self.patched = patched
        self.precision: Precision = training_precision(settings.training_dtype, patched, self.device)
        self.model_sampling = patched.get_model_object("model_sampling")
        self._stack: ExitStack | None = None

    # -- the frozen model, for the duration of training --

    def __enter__(self) -> TrainingDenoiser:
        comfy.model_management.load_models_gpu([self.patched], force_full_load=True)
        unet = self.patched.model.diffusion_model
        with ExitStack() as stack:
            stack.enter_context(without_inference_tensors(unet))
            stack.enter_context(frozen(unet))
            stack.enter_context(autograd_safe_residuals(unet))
            stack.enter_context(gradient_checkpointing(unet, self.settings.gradient_checkpointing))
            self._stack = stack.pop_all()
        log.info("Encoder training: %s UNet frozen on %s (text attention %s%s)", self.family, self.device,
                 self.settings.text_attention, ", gradient checkpointing" if self.settings.gradient_checkpointing
                 else "")
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def process_latent_in(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (as VAEEncode gives them) scaled for this model, as its sampling does."""
        return self.patched.model.process_latent_in(latents)

    # -- one prediction --

    def __call__(self, x_noisy: torch.Tensor, sigma: torch.Tensor, id_kv: IDKeysValuesByLayer,
                 prompts_context: torch.Tensor | None, prompts_pooled: torch.Tensor | None = None) -> torch.Tensor:
        if self._stack is None:
            raise TrainingError("The training denoiser was called outside `with denoiser:`; its UNet would not be "
                                "frozen. Enter it for the whole training run.")
        rows = x_noisy.shape[0]
        if self.settings.text_attention_on:
            if prompts_context is None:
                raise TrainingError("text_attention is on but no prompts_context was given.")
            context = prompts_context.to(x_noisy.device)
        else:
            # The text attention is not computed: ComfyUI still projects the context, so it gets one zero token,
            # and the prompt (pooled text included) never reaches the UNet.
            context, prompts_pooled = x_noisy.new_zeros(rows, 1, self.context_dim), None
        pooled = None
        if self.family == "sdxl":
            pooled = prompts_pooled if prompts_pooled is not None else x_noisy.new_zeros(rows, POOLED_WIDTH)
        size = (x_noisy.shape[-2] * LATENT_FACTOR, x_noisy.shape[-1] * LATENT_FACTOR)
        extra = model_extra_conds(self.patched, pooled, size, x_noisy.device)
        options = dict(self.patched.model_options.get("transformer_options", {}))
        options.update({ID_KEYS_VALUES: id_kv, "cond_or_uncond": [0], "sigmas": sigma})
        return self.patched.model.apply_model(x_noisy, sigma, c_crossattn=context, transformer_options=options,
                                              **{name: cond.to(x_noisy.device) for name, cond in extra.items()})


def training_denoiser(model_patcher, settings: EncoderTrainingSettings,
                      device: torch.device | None = None) -> TrainingDenoiser:
    """The frozen UNet of ``model_patcher`` as the training denoiser (on ``device``, default its load device)."""
    return TrainingDenoiser(model_patcher, settings, device)


def encode_crops(vae, images_uint8: torch.Tensor, process_latent_in=None) -> torch.Tensor:
    """Latents of (N, H, W, 3) uint8 crops through ComfyUI's VAE, as VAEEncode computes them; scaled for a model
    when ``process_latent_in`` (e.g. ``TrainingDenoiser.process_latent_in``) is given. H and W: multiples of 8."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise TrainingError(f"Training crops must be (N, H, W, 3) uint8, got {tuple(images_uint8.shape)} "
                            f"{images_uint8.dtype}.")
    if images_uint8.shape[1] % LATENT_FACTOR or images_uint8.shape[2] % LATENT_FACTOR:
        raise TrainingError(f"Training crops of {images_uint8.shape[2]}x{images_uint8.shape[1]} px: width and height "
                            f"must be multiples of {LATENT_FACTOR}; use a resolution that is.")
    with torch.inference_mode(False), torch.no_grad():
        latents = vae.encode(images_uint8.float() / 255.0).float()
        if process_latent_in is not None:
            latents = process_latent_in(latents)
        return latents.clone()  # a normal tensor, even when ComfyUI computed it in inference mode


def checkpoint_models(path: str, weight_dtype: torch.dtype | None = None):
    """(MODEL, CLIP, VAE) of an SD1.5/SDXL checkpoint file through ComfyUI's own loader; ``weight_dtype`` sets
    the UNet's weight dtype (None: ComfyUI's choice for the device)."""
    if not Path(path).is_file():
        raise TrainingError(f"Checkpoint {path} does not exist; give the path of an SD1.5 or SDXL .safetensors file.")
    options = {} if weight_dtype is None else {"dtype": weight_dtype}
    loaded = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True, output_clipvision=False,
                                                   embedding_directory=None, model_options=options)
    model, clip, vae = loaded[:3]
    if model is None:
        raise TrainingError(f"Checkpoint {path} holds no UNet ComfyUI recognises; use an SD1.5 or SDXL checkpoint.")
    return model, clip, vae
