"""One training run of IDFuse Train Identity: set-up (photos or a photo folder, masks, captions, the held-out
validation photo, prompts, the patched model), the training loop under ComfyUI's model management with
progress and previews, sample rounds and validation loss on the sample_every cadence, checkpoints, resume,
and the output files. The node (nodes/train.py) only gathers its inputs."""

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
from torch import nn

from ...models.errors import NonFiniteLossError, TrainingError
from ...models.files import atomic_save_safetensors, atomic_write_text, read_safetensors
from ...models.tokens.format import ENCODERS, IDTokens
from ...models.tokens.generator import GeneratorConfig, IDTokenGenerator
from ...models.training.frozen import training_context
from ...models.training.lora import lora_hooks
from ...models.training.losses import attention_loss_for
from ...models.training.photos import prepare_photos, training_variants
from ...models.training.plots import render_attention_panels, render_loss_curve
from ...models.training.report import final_losses, training_report
from ...models.training.sample_grid import preview_picture
from ...models.training.settings import TrainingSettings
from ...models.training.token_trainer import Evaluation, Host, IdentityTrainer, PromptTable, TrainingData
from ...models.unet import FAMILY_NAMES, masks_on_grid
from .lora_files import load_adapters, lora_layers, model_with_lora, new_adapters, save_lora
from .model_info import TRAINING_TIMESTEPS, check_model_sampling, clip_family, model_family
from .training_files import (
    TRAINER_FORMAT,
    OutputFiles,
    check_resumable,
    resume_source,
)
from .training_masks import face_masks
from .training_models import (
    Denoiser,
    SplicingTextEncoder,
    model_compute_dtype,
    model_extra_conds,
    patched_clone,
    training_precision,
)
from .training_photos import photos_at_resolution
from .training_samples import SampleRounds, sample_steps_due

log = logging.getLogger("idfuse.nodes")

# The parts of a run, in order, as the report of an interrupted run names them ("stopped": {"phase": ...}).
PHASES = ("encoding photos", "encoding prompts", "evaluation before training", "training", "checkpoint save",
          "sample images", "validation loss", "final save", "evaluation after training")


class Timing:
    """Where the run's time went: training apart from the sample rounds and the validation loss (their cost
    is reported on its own, so step times stay comparable with and without them)."""

    def __init__(self):
        self.training_seconds = 0.0
        self.validation_seconds = 0.0

    def report(self, samples: SampleRounds) -> dict:
        return {"training_seconds": round(self.training_seconds, 3), "sampling_seconds": round(samples.seconds, 3),
                "sample_rounds": len(samples.rounds), "validation_seconds": round(self.validation_seconds, 3)}


class TrainingRun:
    """One execution of the node: set up, train, save, and build the outputs."""

    def __init__(self, model, clip, vae, settings: TrainingSettings, save_name: str, resume_from: str):
        if clip is None or vae is None:
            raise TrainingError("IDFuse Train Identity needs the checkpoint's CLIP and VAE; connect both.")
        self.files = OutputFiles(save_name)  # a save_name that cannot be written fails before any work
        self.family = model_family(model)
        check_model_sampling(model, "IDFuse Train Identity", TRAINING_TIMESTEPS)
        clip_kind = clip_family(clip.tokenize(settings.placeholder))
        if clip_kind != self.family:
            raise TrainingError(f"The CLIP is {FAMILY_NAMES[clip_kind]}'s but the model is "
                                f"{FAMILY_NAMES[self.family]}; connect the CLIP of the same checkpoint.")
        if model.model.model_config.unet_config.get("in_channels", 4) != 4:
            raise TrainingError("This model takes extra input channels (inpainting?); train on a plain SD1.5 or "
                                "SDXL checkpoint.")
        self.model, self.clip, self.vae, self.settings = model, clip, vae, settings
        if settings.validation_loss and settings.sample_every == 0:
            raise TrainingError("validation_loss is on but sample_every is 0 (never), so it would never be "
                                "measured; set sample_every to how often to measure it (e.g. 100), or turn "
                                "validation_loss off.")
        self.samples = SampleRounds(model, clip, vae, settings, self.files.samples)  # prompts checked here
        self.resume_path, self.resume_tokens = resume_source(resume_from)
        self.files.check_free(self.resume_path, settings.lora_rank > 0)
        self.training_meta: dict = {}
        self.validation_latents: torch.Tensor | None = None
        self.validation_source: dict | None = None  # what the report says about the held-out photos
        self.timing = Timing()
        self.phase = PHASES[0]  # what the run is doing, for the report if the user interrupts it

    # -- set-up --

    def _photos(self, images, masks, face_analysis, training_photos
                ) -> tuple[torch.Tensor, torch.Tensor | None, list[str | None]]:
        """The photos from images or from training_photos (cropped around the face at the training size),
        their masks and each photo's caption template (None: no caption)."""
        if (images is None) == (training_photos is None):
            given = "both are connected" if images is not None else "neither is connected"
            raise TrainingError(f"IDFuse Train Identity takes its photos from images or from training_photos, and "
                                f"{given}. Connect exactly one: images (an IMAGE batch, e.g. Load Image) or "
                                f"training_photos (IDFuse Load Training Photos: a folder, with optional captions).")
        if training_photos is None:
            return images, masks, [None] * images.shape[0]
        if masks is not None:  # masks drawn on the photos would not line up with the trainer's face crops
            raise TrainingError("masks belongs to the images input: with training_photos the trainer crops each photo "
                                "around its face and makes the face masks on the crops. Disconnect masks, or connect "
                                "the photos as images (e.g. Load Image) to train with your own masks.")
        crops, crop_masks, templates = photos_at_resolution(training_photos, face_analysis, self.settings.resolution,
                                                            self.settings.placeholder)
        return crops, crop_masks, list(templates)

    def _held_out(self, images, masks, templates, validation_images):
        """With validation_loss: the photos scored and not trained on (validation_images, else the last photo,
        then left out of the training photos with its mask and caption)."""
        if not self.settings.validation_loss:
            return images, masks, templates, None
        if validation_images is not None:
            self.validation_source = {"images": "validation_images", "count": int(validation_images.shape[0])}
            return images, masks, templates, validation_images
        count = images.shape[0]
        if count < 2:
            raise TrainingError("validation_loss holds the last photo out of training, but there is only one photo. "
                                "Connect a held-out photo of the person to validation_images, add photos, or turn "
                                "validation_loss off.")
        self.validation_source = {"images": f"the last photo ({count} of {count}), held out of training", "count": 1}
        if masks is not None and masks.ndim == 3 and masks.shape[0] == count:
            masks = masks[:-1]
        return images[:-1], masks, templates[:-1], images[-1:]

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # No graph through the VAE (its weights get no gradients); ComfyUI's VAE samples its posterior,
        # so the draw is seeded (without touching the global random state) to make runs repeatable.
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(self.settings.seed)
            return self.model.model.process_latent_in(self.vae.encode(pixels).float()).detach().cpu()

    def _captions(self, templates: list[str | None]) -> tuple[tuple[str, ...], torch.Tensor | None]:
        """The prompt table's templates (settings.templates, then each distinct caption template) and each
        photo's index in it (-1: no caption; None when no photo has one)."""
        shared = tuple(self.settings.templates)
        distinct = list(dict.fromkeys(t for t in templates if t is not None))
        self.training_meta["captions_sha256"] = hashlib.sha256(json.dumps(templates).encode()).hexdigest()[:16]
        if not distinct:
            return shared, None
        indices = [-1 if t is None else len(shared) + distinct.index(t) for t in templates]
        log.info("%d of %d photos have a caption (%d distinct templates besides the %d shared ones).",
                 sum(t is not None for t in templates), len(templates), len(distinct), len(shared))
        return shared + tuple(distinct), torch.tensor(indices, dtype=torch.long)

    def _data(self, images, masks, face_analysis, validation_images=None, training_photos=None
              ) -> tuple[torch.Tensor, TrainingData, torch.Tensor | None, tuple[str, ...]]:
        s = self.settings
        images, masks, templates = self._photos(images, masks, face_analysis, training_photos)
        images, masks, templates, held_out = self._held_out(images, masks, templates, validation_images)
        if masks is None:  # found on the photos as given: faces are easier to see before shrinking
            masks = face_masks(images, face_analysis, attention_loss_for(s.attention_mode).needs_masks,
                               for_trainer=True)
        photos, photo_masks = prepare_photos(images, masks, s.resolution)
        pixels, variant_masks, originals = training_variants(photos, photo_masks, s.augmentation, s.seed)
        latents = self._encode(pixels)
        if held_out is not None:  # prepared as the training photos are (size, VAE, seeded posterior)
            self.validation_latents = self._encode(prepare_photos(held_out, None, s.resolution)[0])
        latent_hw = tuple(latents.shape[-2:])
        loss_masks = None
        if variant_masks is not None:
            loss_masks = masks_on_grid(variant_masks, latent_hw).view(-1, *latent_hw)
        self.training_meta["photos_sha256"] = hashlib.sha256(photos.numpy().tobytes()).hexdigest()[:16]
        all_templates, photo_templates = self._captions(templates)
        data = TrainingData(latents, loss_masks, originals, photo_templates=photo_templates)
        return photos, data, photo_masks, all_templates

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
        for template in range(len(text.templates)):
            cond, pooled = text.encode_reference(template)
            contexts.append(cond)
            extra_conds.append(model_extra_conds(patched, pooled, pixel_size, device))
        reference = attention_loss_for(self.settings.attention_mode).needs_reference
        table = PromptTable(text.placeholder_positions,
                            torch.cat(contexts) if reference else None,
                            text.reference_positions if reference else None,
                            num_shared_templates=len(self.settings.templates))
        return table, extra_conds

    # -- saving --

    def current_tokens(self, trainer: IdentityTrainer) -> IDTokens:
        with torch.no_grad():
            keys, values = trainer.generator()
        meta = dict(self.training_meta, format=TRAINER_FORMAT, version=1, model_family=self.family,
                    settings=self.settings.to_dict(), generator=trainer.generator.config.to_dict(),
                    steps_done=trainer.step, lora_file=self.files.lora.name if trainer.adapters is not None else None)
        final = final_losses(trainer.history.steps)
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
        log.info("Training checkpoint at step %d saved to %s", trainer.step, ", ".join(str(p) for p in written))
        return written

    # -- the run --

    def run(self, images, masks, face_analysis, validation_images=None, training_photos=None):
        started = time.monotonic()
        s = self.settings
        trainer, before, first_step = None, None, 0
        try:
            self.phase = "encoding photos"
            photos, data, photo_masks, templates = self._data(images, masks, face_analysis, validation_images,
                                                              training_photos)
            self.phase = "encoding prompts"
            text = SplicingTextEncoder(self.clip, self.family, s, templates)
            patched, probes = patched_clone(self.model, self.family, s)
            layers, adapters = self._adapters()
            self.lora_layers = layers
            device = patched.load_device
            precision = training_precision(s.training_dtype, patched, device)
            log.info("Training computes in %s%s%s.", model_compute_dtype(patched),
                     f" under {precision.autocast} autocast" if precision.autocast else "",
                     ", with loss scaling" if precision.loss_scaling else "")
            # The run's load of the UNet and the text encoder: from here on nothing re-enters model management
            # (the prompts are encoded with encode_loaded), so neither is unloaded mid-run; only a sample round
            # (ComfyUI's sampler and VAE) does, and loads them again after it.
            self.loaded_models = [patched, self.clip.patcher]
            comfy.model_management.load_models_gpu(self.loaded_models, force_full_load=True)
            generator = self._generator(text).to(device)
            if adapters is not None:
                adapters.to(device)
            share_masks = None
            if photo_masks is not None:
                share_masks = masks_on_grid(photo_masks, data.latents.shape[-2:]).view(-1, *data.latents.shape[-2:])
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
                self.phase = "evaluation before training"
                before = trainer.evaluate(share_masks)
                if trainer.step == 0:
                    self._validation(trainer)
                self._train(trainer)
                # Saved before the evaluation after training, so an interrupt there keeps the last step.
                self.phase = "final save"
                written = self.save_checkpoint(trainer)
                self.phase = "evaluation after training"
                after = trainer.evaluate(share_masks)
        except comfy.model_management.InterruptProcessingException:
            self._stopped(trainer, first_step, before, time.monotonic() - started)
            raise
        if self.samples.rounds:
            written.append(self.files.samples)
        report = self._report(trainer, first_step, before, after, written, time.monotonic() - started)
        written.append(atomic_write_text(self.files.report, json.dumps(report, indent=2)))
        out_model = self.model
        if adapters is not None:
            out_model = model_with_lora(self.model, adapters, layers)
        tokens = self.current_tokens(trainer)
        comfy.model_management.soft_empty_cache()
        return (tokens, out_model, "\n".join(str(p) for p in written), render_loss_curve(trainer.history),
                render_attention_panels(photos, before.maps, after.maps, before.share, after.share, photo_masks),
                json.dumps(report, indent=2), self.samples.grid())

    def _report(self, trainer: IdentityTrainer, first_step: int, before: Evaluation | None,
                after: Evaluation | None, written: list[Path], seconds: float) -> dict:
        report = training_report(
            identity=self.files.tokens.name, model_family=self.family, settings=self.settings, trainer=trainer,
            first_step=first_step, resumed_from=None if self.resume_tokens is None else self.resume_tokens.source,
            before=before, after=after, files=written, seconds=seconds)
        report["validation_photos"] = self.validation_source
        rounds = [step for step, _images in self.samples.rounds]
        report["sample_images"] = {"folder": str(self.files.samples), "steps": rounds} if self.samples.enabled else None
        report["timing"] = self.timing.report(self.samples)
        return report

    def _stopped(self, trainer: IdentityTrainer | None, first_step: int, before: Evaluation | None,
                 seconds: float) -> None:
        """The user interrupted: keep one consistent set of files of the last completed step (all written
        again, so a save the interrupt cut short is whole), with a report naming the phase. A run that
        completed no step of its own writes nothing: a new save_name stays free, resumed files stay as
        they were."""
        if trainer is None or trainer.step == first_step:
            log.info("Stopped while %s; no step of this run completed, no file written.", self.phase)
            return
        if not trainer.parameters_finite():
            log.warning("Stopped while %s at step %d; the trained parameters are not finite, no file written.",
                        self.phase, trainer.step)
            return
        written = self.save_checkpoint(trainer)
        report = self._report(trainer, first_step, before, None, written, seconds)
        report["stopped"] = {"phase": self.phase, "steps_done": trainer.step}
        written.append(atomic_write_text(self.files.report, json.dumps(report, indent=2)))
        log.info("Stopped while %s at step %d; saved %s. Resume from %s to continue.", self.phase, trainer.step,
                 ", ".join(str(p) for p in written), self.files.tokens.name)

    def _resume_state(self, trainer: IdentityTrainer) -> int:
        if self.resume_path is None:
            return 0
        state_path = Path(self.resume_path).with_suffix(".trainstate")
        if state_path.is_file():
            tensors, metadata = read_safetensors(state_path, TrainingError, "Training state")
            trainer.load_state_tensors(tensors, metadata)
        else:
            trainer.step = int(self.resume_tokens.training.get("steps_done", 0))
            log.warning("%s has no training state beside it; the optimiser restarts at step %d, so "
                        "the run will not repeat an uninterrupted one exactly.", state_path.name, trainer.step)
        previous = self.resume_tokens.training.get("photos_sha256")
        if previous and previous != self.training_meta.get("photos_sha256"):
            log.warning("The photos differ from those of the run being resumed.")
        previous = self.resume_tokens.training.get("captions_sha256")
        if previous and previous != self.training_meta.get("captions_sha256"):
            log.warning("The photos' captions differ from those of the run being resumed.")
        log.info("Resuming training of %s at step %d", self.resume_tokens.source, trainer.step)
        return trainer.step

    def _validation(self, trainer: IdentityTrainer) -> None:
        if self.validation_latents is None:
            return
        self.phase = "validation loss"
        started = time.monotonic()
        value = trainer.record_validation(self.validation_latents)
        seconds = time.monotonic() - started
        self.timing.validation_seconds += seconds
        log.info("Validation loss at step %d: %.5f (%.1f s)", trainer.step, value, seconds)

    def _sample_round(self, trainer: IdentityTrainer) -> None:
        """The sample images and the validation loss of this step (sample_every's cadence and the last step)."""
        if self.samples.enabled:
            self.phase = "sample images"
            self.samples.render(self.current_tokens(trainer), trainer.step)
            # ComfyUI's sampler loaded a clone of the model and the VAE, which may have moved the UNet: load the
            # run's clone and the text encoder in full again before anything trains or scores.
            comfy.model_management.load_models_gpu(self.loaded_models, force_full_load=True)
        self._validation(trainer)
        self.phase = "training"

    def _preview(self, trainer: IdentityTrainer):
        latest = self.samples.latest_picture
        if latest is None:
            return render_loss_curve(trainer.history, size=(384, 192), as_pil=True)
        return preview_picture(render_loss_curve(trainer.history, size=(512, 256), as_pil=True), latest)

    def _train(self, trainer: IdentityTrainer) -> None:
        s = self.settings
        self.phase = "training"
        progress = comfy.utils.ProgressBar(s.steps)
        progress.update_absolute(trainer.step, s.steps)
        outside_training = 0.0  # seconds of sample rounds and validation within the loop

        def on_step(losses) -> None:
            nonlocal outside_training
            if s.checkpoint_every and losses.step % s.checkpoint_every == 0 and losses.step < s.steps:
                self.phase = "checkpoint save"
                self.save_checkpoint(trainer)
                self.phase = "training"
            if sample_steps_due(s, losses.step):
                round_started = time.monotonic()
                self._sample_round(trainer)
                outside_training += time.monotonic() - round_started
            progress.update_absolute(losses.step, s.steps, ("JPEG", self._preview(trainer), 512))

        # An interrupt is handled by run() (it keeps the last completed step whatever the phase).
        started = time.monotonic()
        try:
            trainer.run(on_step)
        except NonFiniteLossError as e:
            if trainer.parameters_finite() and trainer.step > 0:
                self.save_checkpoint(trainer)
                kept = f"The last good state (step {trainer.step}) is saved in {self.files.tokens}."
            elif self.files.tokens.exists():
                kept = f"The last checkpoint in {self.files.tokens} is kept."
            else:
                kept = "Nothing was saved."
            raise TrainingError(f"{e} {kept}") from e
        finally:
            self.timing.training_seconds += time.monotonic() - started - outside_training
