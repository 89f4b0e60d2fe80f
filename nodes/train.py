"""IDFuse Train Identity: learn SeFi-IDE identity tokens (and optionally a LoRA) from a few photos.

ComfyUI glue over models/trainer.py: photos and masks in, the frozen MODEL/CLIP/VAE turned into
the trainer's ``encode`` and ``denoise``, model management, progress, interrupts, files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..models.errors import NonFiniteLossError, TrainingError
from ..models.files import atomic_save_safetensors, atomic_write_text
from ..models.tokens.format import ENCODERS, IDTokens
from ..models.tokens.generator import GeneratorConfig, IDTokenGenerator
from ..models.training.attention import ATTENTION_MODES, MASK_MODES, REFERENCE_MODES, render_attention_panels
from ..models.training.frozen import training_context
from ..models.training.lora import lora_hooks
from ..models.training.photos import AUGMENTATIONS, prepare_photos, training_variants
from ..models.training.plots import render_loss_curve
from ..models.training.settings import DEFAULT_TEMPLATES, LR_SCHEDULES, TRAINING_DTYPES, TrainingSettings
from ..models.training.token_trainer import Evaluation, Host, IdentityTrainer, PromptTable, TrainingData
from ..models.unet import FAMILY_NAMES
from .glue.face_masks import face_masks, mask_preview
from .glue.folders import ID_TOKENS_FOLDER
from .glue.lora_files import (
    LORA_TARGET_CHOICES,
    load_adapters,
    lora_layers,
    model_with_lora,
    new_adapters,
    save_lora,
)
from .glue.model_info import clip_family, model_family
from .glue.training_files import (
    NO_RESUME,
    TRAINER_FORMAT,
    OutputFiles,
    check_resumable,
    resume_source,
)
from .glue.training_models import (
    Denoiser,
    SplicingTextEncoder,
    model_extra_conds,
    patched_clone,
    training_precision,
)

log = logging.getLogger(__name__)

CATEGORY = "IDFuse/training"
LOSS_LAYER_CHOICES: dict[str, tuple[int, ...] | None] = {
    "2, 4": (2, 4), "4": (4,), "2": (2,), "1, 2, 4": (1, 2, 4), "all": None}


# --- the node ---------------------------------------------------------------------------------


class IDFuseTrainIdentity:
    DESCRIPTION = ("Learns an identity from 1-10 photos of a person: SeFi-IDE's per-stage key/value word vectors "
                   "(made by a small trainable attention block over the initialiser word), optionally with a LoRA "
                   "on the UNet's cross-attention. The placeholder's cross-attention is kept on the face by an "
                   "attention loss, so scenes, actions and styles in a prompt still work. Stop any time (the last "
                   "step is saved) and resume later. Files: models/idfuse/tokens/<save_name>.safetensors "
                   "(+ .trainstate, .report.json) and models/loras/<save_name>.safetensors.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ID_TOKENS", "MODEL", "STRING", "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("id_tokens", "model", "files", "loss_curve", "attention_maps", "report")
    OUTPUT_TOOLTIPS = (
        "The learned identity; connect to IDFuse Encode With ID.",
        "The input model with the trained LoRA applied (the input model itself when lora_rank is 0).",
        "The files written, one path per line.",
        "Diffusion and attention loss per step.",
        "Per photo: the photo, then the placeholder's attention at the loss layers before and after training, "
        "with the share inside the face mask.",
        "Settings, steps, final losses and the face-attention share before/after (also saved as JSON).",
    )
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        tokens = folder_paths.get_filename_list(ID_TOKENS_FOLDER)
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD1.5 or SDXL model to learn the identity for (stays frozen)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder (stays frozen)."}),
            "vae": ("VAE", {"tooltip": "Its VAE, to encode the photos."}),
            "images": ("IMAGE", {"tooltip": "1-10 photos of the person, face clearly visible. Resized to 'resolution'."}),
            "placeholder": ("STRING", {"default": "sks", "tooltip": "The new word for the person; must be one token "
                                                                     "(rare words such as 'sks' are)."}),
            "initializer": ("STRING", {"default": "person", "tooltip": "A one-token word the identity starts from and "
                                                                        "that the reference prompt uses."}),
            "num_stages": ("INT", {"default": 5, "min": 1, "max": 20, "tooltip": "Denoising-time stages S; each has "
                                   "its own key and value vector (SeFi-IDE default 5)."}),
            "steps": ("INT", {"default": 600, "min": 1, "max": 100000, "tooltip": "Total optimiser steps (ProSpect's "
                              "~600). When resuming, training continues up to this number."}),
            "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False,
                                        "tooltip": "Adam learning rate (ProSpect default 1e-4)."}),
            "attention_weight": ("FLOAT", {"default": 0.003, "min": 0.0, "max": 100.0, "step": 0.001, "round": False,
                                           "tooltip": "λ in loss = diffusion + λ·attention. 0.003 is the paper's "
                                                      "choice: 1e-4 lets the token take over the image, ≥ 0.01 "
                                                      "loses the identity."}),
            "attention_mode": (list(ATTENTION_MODES), {"default": "face_mask", "tooltip": (
                "face_mask: the placeholder's attention should cover the face mask: mean of A over the background − "
                "mean of A over the face. reference_prompt: it should match 'person' in the same prompt with the initialiser "
                "(same query, same pass; needs no mask). both: the sum. off: diffusion loss only.")}),
            "loss_layers": (list(LOSS_LAYER_CHOICES), {"default": "2, 4", "tooltip": (
                "Downscales (latent / layer grid) of the cross-attention layers the attention loss reads. '2, 4' = "
                "SD1.5's 32x32 and 16x16 layers at 512 px (the method's default); for SDXL it is every layer, "
                "'4' is cheaper.")}),
            "lora_rank": ("INT", {"default": 0, "min": 0, "max": 256, "tooltip": "0 = tokens only. Otherwise a LoRA "
                                  "of this rank on the cross-attention projections, trained with the tokens."}),
            "lora_targets": (list(LORA_TARGET_CHOICES), {"default": "to_k, to_v", "tooltip": (
                "Cross-attention projections the LoRA adapts. K and V (default) act only through the text, so the "
                "model stays unchanged for prompts without the identity's influence on attention.")}),
            "templates": ("STRING", {"multiline": True, "default": "\n".join(DEFAULT_TEMPLATES), "tooltip": (
                "Training prompts, one per line, each with {} where the placeholder goes.")}),
            "augmentation": (list(AUGMENTATIONS), {"default": "flip", "tooltip": (
                "Copies of the photos made once before training: mirrored, and/or 3 random crops of 75-100% "
                "scaled back up. Masks follow.")}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip": (
                "Training size: photos are scaled to about resolution² pixels, sides rounded to 64. 512 for SD1.5, "
                "1024 for SDXL.")}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": (
                "Samples per micro-batch (each with its own photo, template and timestep).")}),
            "gradient_accumulation": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": (
                "Micro-batches per optimiser step.")}),
            "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": (
                "Recompute UNet layers in the backward pass: less memory, about a third slower.")}),
            "training_dtype": (list(TRAINING_DTYPES), {"default": "auto", "tooltip": (
                "auto = bfloat16 autocast on GPUs that support it, else the model's own dtype (float16 with loss "
                "scaling). float16: for GPUs without bfloat16 (GTX 10xx/16xx, RTX 20xx, T4), with loss scaling. "
                "float32: exact but slowest. The trained weights stay float32.")}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False, "tooltip": (
                "Seeds initialisation, sampling and augmentation; keep it when resuming to repeat the same run.")}),
            "save_name": ("STRING", {"default": "idfuse_identity", "tooltip": "File name (no extension) for the "
                                     "tokens in models/idfuse/tokens and the LoRA in models/loras."}),
            "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 100000, "tooltip": (
                "Save every N steps (0 = only at the end and when stopped).")}),
            "resume_from": ([NO_RESUME, *tokens], {"default": NO_RESUME, "tooltip": (
                "Continue a run from its token file (with its LoRA and .trainstate). Use the same settings and "
                "photos; save_name may be the same file.")}),
            "lr_schedule": (list(LR_SCHEDULES), {"default": "constant", "tooltip": (
                "Learning-rate schedule (diffusers' get_scheduler; needs diffusers unless constant).")}),
            "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": (
                "Steps over which the learning rate rises from 0 (needs diffusers when > 0).")}),
            "min_snr_gamma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.5, "tooltip": (
                "Min-SNR-γ loss weighting (5 is common); 0 = off. Needs diffusers.")}),
            "detach_reference": ("BOOLEAN", {"default": True, "tooltip": (
                "reference_prompt: treat the initialiser's attention as a fixed target (the method's default). "
                "Off lets the LoRA move it too.")}),
        }, "optional": {
            "masks": ("MASK", {"tooltip": "Face masks, one per photo (or one for all), 1 = face. Resized to the "
                               "photos. Without them a face detector makes them."}),
            "face_analysis": ("FACE_ANALYSIS", {"tooltip": "insightface face analysis (IDFuse Load Face Analysis) to "
                                                "find faces when no masks are given; else the built-in frontal-face cascade."}),
        }}

    def train(self, model, clip, vae, images, placeholder: str, initializer: str, num_stages: int, steps: int,
              learning_rate: float, attention_weight: float, attention_mode: str, loss_layers: str, lora_rank: int,
              lora_targets: str, templates: str, augmentation: str, resolution: int, batch_size: int,
              gradient_accumulation: int, gradient_checkpointing: bool, training_dtype: str, seed: int,
              save_name: str, checkpoint_every: int, resume_from: str, lr_schedule: str, warmup_steps: int,
              min_snr_gamma: float, detach_reference: bool, masks=None, face_analysis=None):
        settings = TrainingSettings(
            placeholder=placeholder.strip(), initializer=initializer.strip(), num_stages=num_stages, steps=steps,
            learning_rate=learning_rate, attention_weight=attention_weight, attention_mode=attention_mode,
            loss_downscales=_loss_downscales(loss_layers), lora_rank=lora_rank,
            lora_targets=_lora_targets(lora_targets), templates=_templates(templates), augmentation=augmentation,
            resolution=resolution, batch_size=batch_size, gradient_accumulation=gradient_accumulation,
            gradient_checkpointing=gradient_checkpointing, training_dtype=training_dtype, seed=seed,
            checkpoint_every=checkpoint_every, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
            min_snr_gamma=min_snr_gamma, detach_reference=detach_reference)
        with torch.inference_mode(False), torch.enable_grad():
            return TrainingRun(model, clip, vae, settings, save_name, resume_from).run(images, masks, face_analysis)


def _loss_downscales(choice: str) -> tuple[int, ...] | None:
    if choice not in LOSS_LAYER_CHOICES:
        raise TrainingError(f"loss_layers '{choice}' is not one of {', '.join(LOSS_LAYER_CHOICES)}.")
    return LOSS_LAYER_CHOICES[choice]


def _lora_targets(choice: str) -> tuple[str, ...]:
    if choice not in LORA_TARGET_CHOICES:
        raise TrainingError(f"lora_targets '{choice}' is not one of {', '.join(LORA_TARGET_CHOICES)}.")
    return LORA_TARGET_CHOICES[choice]


def _templates(text: str) -> tuple[str, ...]:
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        raise TrainingError("templates is empty; write at least one prompt with {} for the placeholder, e.g. "
                            "'a photo of the face of {}'.")
    return lines


def _final_losses(trainer: IdentityTrainer, last: int = 10) -> dict[str, float] | None:
    """Mean losses of the last steps (single steps are noisy: each has its own random timestep)."""
    recent = trainer.history.steps[-last:]
    if not recent:
        return None
    return {"diffusion": sum(s.diffusion for s in recent) / len(recent),
            "attention": sum(s.attention for s in recent) / len(recent), "over_steps": len(recent)}


class TrainingRun:
    """One execution of the node: set up, train, save, and build the outputs."""

    def __init__(self, model, clip, vae, settings: TrainingSettings, save_name: str, resume_from: str):
        if clip is None or vae is None:
            raise TrainingError("IDFuse Train Identity needs the checkpoint's CLIP and VAE; connect both.")
        self.family = model_family(model)
        clip_kind = clip_family(clip.tokenize(settings.placeholder))
        if clip_kind != self.family:
            raise TrainingError(f"The CLIP is {FAMILY_NAMES[clip_kind]}'s but the model is "
                                f"{FAMILY_NAMES[self.family]}; connect the CLIP of the same checkpoint.")
        if model.model.model_config.unet_config.get("in_channels", 4) != 4:
            raise TrainingError("This model takes extra input channels (inpainting?); train on a plain SD1.5 or "
                                "SDXL checkpoint.")
        self.model, self.clip, self.vae, self.settings = model, clip, vae, settings
        self.files = OutputFiles(save_name)
        self.resume_path, self.resume_tokens = resume_source(resume_from)
        self.files.check_free(self.resume_path, settings.lora_rank > 0)
        self.training_meta: dict = {}

    # -- set-up --

    def _data(self, images, masks, face_analysis) -> tuple[torch.Tensor, TrainingData, torch.Tensor | None]:
        s = self.settings
        if masks is None:  # found on the photos as given: faces are easier to see before shrinking
            masks = face_masks(images, face_analysis, required=s.attention_mode in MASK_MODES)
        photos, photo_masks = prepare_photos(images, masks, s.resolution)
        pixels, variant_masks, originals = training_variants(photos, photo_masks, s.augmentation, s.seed)
        # No graph through the VAE (its weights get no gradients); ComfyUI's VAE samples its posterior,
        # so the draw is seeded (without touching the global random state) to make runs repeatable.
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(s.seed)
            latents = self.model.model.process_latent_in(self.vae.encode(pixels).float()).detach().cpu()
        latent_hw = tuple(latents.shape[-2:])
        loss_masks = None
        if variant_masks is not None:
            loss_masks = torch.nn.functional.interpolate(variant_masks.unsqueeze(1), size=latent_hw, mode="area")[:, 0]
        self.training_meta["photos_sha256"] = hashlib.sha256(photos.numpy().tobytes()).hexdigest()[:16]
        return photos, TrainingData(latents, loss_masks, originals), photo_masks

    def _generator(self, text: SplicingTextEncoder) -> IDTokenGenerator:
        s = self.settings
        config = GeneratorConfig(num_stages=s.num_stages, encoders=dict(ENCODERS[self.family]),
                                 width=s.generator_width)
        if self.resume_tokens is None:
            return IDTokenGenerator(config, text.initializer_embeddings(), seed=s.seed)
        training = check_resumable(self.resume_tokens, s, self.family)
        config = GeneratorConfig.from_dict(training["generator"])
        stored = self.resume_tokens.generator
        generator = IDTokenGenerator(config, {n: stored[f"initializer.{n}"] for n in config.encoders}, seed=s.seed)
        generator.load_state_dict(stored)
        return generator

    def _adapters(self) -> tuple[dict, nn.ModuleDict | None]:
        s = self.settings
        if s.lora_rank == 0:
            return {}, None
        layers = lora_layers(self.model, self.family, s.lora_targets)
        if self.resume_tokens is not None:
            lora_file = self.resume_tokens.training.get("lora_file")
            path = lora_file and folder_paths.get_full_path("loras", lora_file)
            if not path:
                raise TrainingError(f"resume_from {self.resume_tokens.source} trained a LoRA '{lora_file}' that is not "
                                    f"in models/loras; put it back, or start a new run.")
            return layers, load_adapters(path, layers, s.lora_rank)
        return layers, new_adapters(layers, s.lora_rank, s.seed)

    def _prompts(self, text: SplicingTextEncoder, patched, latent_hw, device) -> tuple[PromptTable, list[dict]]:
        contexts, extra_conds = [], []
        pixel_size = (latent_hw[0] * 8, latent_hw[1] * 8)
        for template in range(len(self.settings.templates)):
            cond, pooled = text.encode_reference(template)
            contexts.append(cond)
            extra_conds.append(model_extra_conds(patched, pooled, pixel_size, device))
        reference = self.settings.attention_mode in REFERENCE_MODES
        table = PromptTable(text.placeholder_positions,
                            torch.cat(contexts) if reference else None,
                            text.reference_positions if reference else None)
        return table, extra_conds

    # -- saving --

    def current_tokens(self, trainer: IdentityTrainer) -> IDTokens:
        with torch.no_grad():
            keys, values = trainer.generator()
        meta = dict(self.training_meta, format=TRAINER_FORMAT, version=1, model_family=self.family,
                    settings=self.settings.to_dict(), generator=trainer.generator.config.to_dict(),
                    steps_done=trainer.step, lora_file=self.files.lora.name if trainer.adapters is not None else None)
        final = _final_losses(trainer)
        if final is not None:
            meta["final_losses"] = final
        generator_state = {k: v.detach().float().cpu() for k, v in trainer.generator.state_dict().items()}
        return IDTokens(family=self.family, placeholder=self.settings.placeholder,
                        initializer=self.settings.initializer,
                        keys={n: v.detach().float().cpu() for n, v in keys.items()},
                        values={n: v.detach().float().cpu() for n, v in values.items()},
                        generator=generator_state, training=meta, source=self.files.tokens.name)

    def save_checkpoint(self, trainer: IdentityTrainer) -> list[Path]:
        """Tokens, LoRA and training state of the current step; each file written atomically."""
        tokens = self.current_tokens(trainer)
        written = [tokens.save(self.files.tokens)]
        if trainer.adapters is not None:
            save_lora(self.model, trainer.adapters, self.lora_layers, self.files.lora,
                      {"format": "idfuse.lora", "idfuse_identity": tokens.source, "steps_done": str(trainer.step)})
            written.append(self.files.lora)
        state, metadata = trainer.state_tensors()
        written.append(atomic_save_safetensors(state, self.files.state, metadata))
        log.info("IDFuse trainer: saved step %d to %s", trainer.step, ", ".join(str(p) for p in written))
        return written

    # -- the run --

    def run(self, images, masks, face_analysis):
        started = time.monotonic()
        s = self.settings
        photos, data, photo_masks = self._data(images, masks, face_analysis)
        text = SplicingTextEncoder(self.clip, self.family, s)
        patched, probes = patched_clone(self.model, self.family, s)
        layers, adapters = self._adapters()
        self.lora_layers = layers
        device = patched.load_device
        precision = training_precision(s.training_dtype, patched, device)
        comfy.model_management.load_models_gpu([patched, self.clip.patcher], force_full_load=True)
        generator = self._generator(text).to(device)
        if adapters is not None:
            adapters.to(device)
        share_masks = None
        if photo_masks is not None:
            share_masks = torch.nn.functional.interpolate(photo_masks.unsqueeze(1), size=data.latents.shape[-2:],
                                                          mode="area")[:, 0]
        with ExitStack() as stack:
            stack.enter_context(training_context(unet=patched.model.diffusion_model,
                                                 text_encoders=self.clip.cond_stage_model,
                                                 checkpointing=s.gradient_checkpointing))
            stack.enter_context(text.hooks())
            if adapters is not None:
                stack.enter_context(lora_hooks({k: layer for k, (_p, layer) in layers.items()}, adapters))
            prompts, extra_conds = self._prompts(text, patched, data.latents.shape[-2:], device)
            host = Host(encode=text.encode, denoise=Denoiser(patched, extra_conds),
                        model_sampling=patched.get_model_object("model_sampling"), device=device,
                        check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                        autocast_dtype=precision.autocast, loss_scaling=precision.loss_scaling)
            trainer = IdentityTrainer(s, host, data, prompts, probes, generator, adapters)
            first_step = self._resume_state(trainer)
            before = trainer.evaluate(share_masks)
            self._train(trainer)
            after = trainer.evaluate(share_masks)
        written = self.save_checkpoint(trainer)
        report = self._report(trainer, first_step, before, after, written, time.monotonic() - started)
        written.append(atomic_write_text(self.files.report, json.dumps(report, indent=2)))
        out_model = self.model
        if adapters is not None:
            out_model = model_with_lora(self.model, adapters, layers)
        tokens = self.current_tokens(trainer)
        comfy.model_management.soft_empty_cache()
        return (tokens, out_model, "\n".join(str(p) for p in written), render_loss_curve(trainer.history),
                render_attention_panels(photos, before.maps, after.maps, before.share, after.share, photo_masks),
                json.dumps(report, indent=2))

    def _resume_state(self, trainer: IdentityTrainer) -> int:
        if self.resume_path is None:
            return 0
        state_path = Path(self.resume_path).with_suffix(".trainstate")
        if state_path.is_file():
            with safe_open(str(state_path), framework="pt") as f:
                metadata = f.metadata() or {}
            trainer.load_state_tensors(load_file(str(state_path)), metadata)
        else:
            trainer.step = int(self.resume_tokens.training.get("steps_done", 0))
            log.warning("IDFuse trainer: %s has no training state beside it; the optimiser restarts at step %d, so "
                        "the run will not repeat an uninterrupted one exactly.", state_path.name, trainer.step)
        previous = self.resume_tokens.training.get("photos_sha256")
        if previous and previous != self.training_meta.get("photos_sha256"):
            log.warning("IDFuse trainer: the photos differ from those of the run being resumed.")
        log.info("IDFuse trainer: resuming %s at step %d", self.resume_tokens.source, trainer.step)
        return trainer.step

    def _train(self, trainer: IdentityTrainer) -> None:
        s = self.settings
        progress = comfy.utils.ProgressBar(s.steps)
        progress.update_absolute(trainer.step, s.steps)

        def on_step(losses) -> None:
            preview = render_loss_curve(trainer.history, size=(384, 192), as_pil=True)
            if s.checkpoint_every and losses.step % s.checkpoint_every == 0 and losses.step < s.steps:
                self.save_checkpoint(trainer)
            progress.update_absolute(losses.step, s.steps, ("JPEG", preview, 512))

        try:
            trainer.run(on_step)
        except comfy.model_management.InterruptProcessingException:
            if trainer.parameters_finite():
                self.save_checkpoint(trainer)
                log.info("IDFuse trainer: stopped at step %d; resume from %s to continue.", trainer.step,
                         self.files.tokens.name)
            raise
        except NonFiniteLossError as e:
            if trainer.parameters_finite() and trainer.step > 0:
                self.save_checkpoint(trainer)
                kept = f"The last good state (step {trainer.step}) is saved in {self.files.tokens}."
            elif self.files.tokens.exists():
                kept = f"The last checkpoint in {self.files.tokens} is kept."
            else:
                kept = "Nothing was saved."
            raise TrainingError(f"{e} {kept}") from e

    def _report(self, trainer: IdentityTrainer, first_step: int, before: Evaluation, after: Evaluation,
                written: list[Path], seconds: float) -> dict:
        def share(evaluation: Evaluation):
            return None if evaluation.share is None else round(float(evaluation.share.mean()), 4)

        report = {
            "identity": self.files.tokens.name, "model_family": self.family, "settings": self.settings.to_dict(),
            "steps_done": trainer.step, "steps_this_run": trainer.step - first_step,
            "resumed_from": None if self.resume_tokens is None else self.resume_tokens.source,
            "final_losses": _final_losses(trainer),
            "evaluation_diffusion_loss": {"before": before.diffusion_loss, "after": after.diffusion_loss},
            "face_attention_share": {"before": share(before), "after": share(after)},
            "files": [str(p) for p in written], "seconds": round(seconds, 1),
        }
        if trainer.scaler is not None:
            report["float16_loss_scaling"] = {"final_scale": trainer.scaler.get_scale(),
                                              "skipped_steps": trainer.skipped_total}
        if before.share is not None:
            report["face_attention_share"]["per_photo"] = {
                "before": [round(float(v), 4) for v in before.share], "after": [round(float(v), 4) for v in after.share]}
        else:
            report["face_attention_share"]["note"] = "no face masks (none given and no face detected)"
        return report


class IDFuseFaceMasks:
    DESCRIPTION = ("Finds the main face in each photo and makes an elliptic face mask (1 = face), as IDFuse Train "
                   "Identity does when its masks input is empty. Use it to check the masks before training, or "
                   "edit them (e.g. Grow Mask) and connect them to the trainer. The built-in detector (scikit-image's "
                   "frontal-face cascade) needs nothing else; connect IDFuse Load Face Analysis for insightface's "
                   "detector, which also finds turned faces.")
    CATEGORY = "IDFuse/training"
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("masks", "preview")
    OUTPUT_TOOLTIPS = ("One face mask per photo, the photos' size.",
                       "The photos with everything outside the mask dimmed.")
    FUNCTION = "find"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Photos of the person, one face each (the largest counts)."}),
        }, "optional": {
            "face_analysis": ("FACE_ANALYSIS", {"tooltip": "insightface face analysis (IDFuse Load Face Analysis); "
                                                "without it the built-in frontal-face cascade is used."}),
        }}

    def find(self, images: torch.Tensor, face_analysis=None):
        masks = face_masks(images, face_analysis, required=True)
        return masks, mask_preview(images, masks)


NODE_CLASS_MAPPINGS = {"IDFuseTrainIdentity": IDFuseTrainIdentity, "IDFuseFaceMasks": IDFuseFaceMasks}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFuseTrainIdentity": "IDFuse Train Identity", "IDFuseFaceMasks": "IDFuse Face Masks"}
