"""Train an IDFuse ID encoder (Infinite-ID's identity-enhanced training) on a prepared face dataset, with accelerate.

    accelerate launch scripts/train_id_encoder.py --checkpoint sd15.safetensors --data faces/ --output run/
    python scripts/train_id_encoder.py ...                     (one process)
    accelerate launch --multi_gpu --num_processes 8 scripts/train_id_encoder.py ...
    accelerate launch --multi_gpu --num_processes 2 scripts/train_id_encoder.py --cpu ...   (CPU, gloo)

(accelerate 1.x runs ONE process for ``accelerate launch --cpu --num_processes 2``; several CPU processes need
``--multi_gpu`` on the launcher and ``--cpu`` on this script.)

The frozen UNet comes from the checkpoint through ComfyUI's own loader; the trainable encoder is new (sizes from
the flags) or converted from an IP-Adapter FaceID-Plus / PlusV2 file (``--init``). The pairs: the dataset's
identities, a reference and a different target photo each, chosen from (seed, step, global sample index)
(``models/training/encoder_data.py``), so the run does not depend on the number of processes and resumes exactly.

Writes into ``--output``: ``checkpoints/step_XXXXXX/`` (accelerate's full state plus ``idfuse_progress.json``,
written to a temporary folder and renamed when complete; the last ``--keep-checkpoints`` kept), the encoder
``<name>.safetensors`` and ``<name>_step_XXXXXX.safetensors`` at each checkpoint and at the end, and TensorBoard
logs (loss, lr, grad norm, data-wait share; validation grids).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import host

log = logging.getLogger("idfuse.training")


class _MainProcessOnly(logging.LoggerAdapter):
    """Run summaries once, from the main process (every process computes them)."""

    def log(self, level, msg, *args, **kwargs):
        if int(os.environ.get("RANK", "0")) == 0:
            self.logger.log(level, msg, *args, **kwargs)


main_log = _MainProcessOnly(log, {})

CHECKPOINTS_FOLDER = "checkpoints"
CHECKPOINT_PREFIX = "step_"
PROGRESS_FILE = "idfuse_progress.json"
PROGRESS_FORMAT = "idfuse.encoder_training_progress"
TRACKER_PROJECT = "idfuse_encoder"
DEFAULT_NAME = "idfuse_encoder"
DEFAULT_PROMPT = "a photo of a person"
RESUME_LATEST = "latest"
INTERRUPTED_EXIT_CODE = 130
# The flag names the issue uses, for settings whose field names differ.
FLAG_ALIASES = {
    "checkpoint_every": ("--save-every",),
    "validation_every": ("--validate-every",),
    "gradient_accumulation": ("--gradient-accumulation-steps",),
}
# Settings that are not flags: the dataset decides them.
SETTINGS_FROM_DATA = ("resolution",)
# create_idfuse_encoder's size arguments offered as flags (their defaults read from its signature).
ENCODER_SIZE_ARGUMENTS = ("face_hidden_dim", "clip_mapper_dim", "clip_mapper_depth", "ff_mult")


# --------------------------------------------------------------------------------------------- flags


def _imports():
    """The pack's plain-torch modules (no ComfyUI needed)."""
    host.pack()
    from comfyui_idfuse.models.encoders.kinds.idfuse import create_idfuse_encoder
    from comfyui_idfuse.models.training import encoder_settings

    return encoder_settings, create_idfuse_encoder


def _setting_flags(parser: argparse.ArgumentParser) -> None:
    encoder_settings, _ = _imports()
    from comfyui_idfuse.models.training.settings import LR_SCHEDULES

    choices = {"text_attention": encoder_settings.TEXT_ATTENTION_MODES,
               "mixed_precision": encoder_settings.MIXED_PRECISIONS, "lr_schedule": LR_SCHEDULES}
    group = parser.add_argument_group("training settings (models/training/encoder_settings.py)")
    for spec in dataclasses.fields(encoder_settings.EncoderTrainingSettings):
        if spec.name in SETTINGS_FROM_DATA:
            continue
        flags = (f"--{spec.name.replace('_', '-')}", *FLAG_ALIASES.get(spec.name, ()))
        limits = encoder_settings.encoder_setting_range(spec.name)
        shown = f"default {spec.default}" + (f"; {limits['min']}..{limits['max']}" if limits else "")
        if isinstance(spec.default, bool):
            group.add_argument(*flags, dest=spec.name, action=argparse.BooleanOptionalAction, default=spec.default,
                               help=shown)
        else:
            group.add_argument(*flags, dest=spec.name, type=type(spec.default), default=spec.default,
                               choices=choices.get(spec.name), help=shown)


def _encoder_size_flags(parser: argparse.ArgumentParser) -> None:
    _, create_idfuse_encoder = _imports()
    signature = inspect.signature(create_idfuse_encoder).parameters
    group = parser.add_argument_group("a new encoder's sizes (create_idfuse_encoder; ignored with --init)")
    for name in ENCODER_SIZE_ARGUMENTS:
        default = signature[name].default
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=default,
                           help=f"default {default}" + (" (the context width)" if default is None else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train_id_encoder.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="SD1.5 or SDXL checkpoint (.safetensors): the frozen UNet "
                        "(and its CLIP for --text-attention on and validation, its VAE when the data has no latents)")
    parser.add_argument("--data", required=True, help="a dataset folder written by scripts/prepare_faces.py")
    parser.add_argument("--output", required=True, help="the run's folder (checkpoints, encoder files, logs)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="file name of the exported encoder (no extension)")
    parser.add_argument("--init", default=None, help="an IP-Adapter FaceID-Plus / PlusV2 file of the checkpoint's "
                        "family to start from (default: random weights)")
    parser.add_argument("--prompt", action="append", default=None, help=f"a training prompt for --text-attention "
                        f"on and a validation column; repeat for several (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--resume", default=None, help=f"'{RESUME_LATEST}' (the newest complete checkpoint of "
                        f"--output) or a checkpoint folder")
    parser.add_argument("--keep-checkpoints", type=int, default=3, help="how many checkpoint folders to keep (0 = all)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between tracker lines")
    parser.add_argument("--validation-identities", type=int, default=4, help="identities held out of training for "
                        "the validation images (the same ones in every run on this dataset)")
    parser.add_argument("--validation-sampling-steps", type=int, default=4, help="sampler steps of a validation image")
    parser.add_argument("--validation-size", type=int, default=256, help="validation image size (pixels)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (gloo between processes)")
    parser.add_argument("--comfyui", default=None, help="the ComfyUI folder (default: COMFYUI_PATH, or the ComfyUI "
                        "this pack is installed in)")
    _setting_flags(parser)
    _encoder_size_flags(parser)
    return parser


def settings_from_args(args: argparse.Namespace, resolution: int):
    encoder_settings, _ = _imports()
    names = [f.name for f in dataclasses.fields(encoder_settings.EncoderTrainingSettings)]
    values = {name: getattr(args, name) for name in names if name not in SETTINGS_FROM_DATA}
    return encoder_settings.EncoderTrainingSettings(**values, resolution=resolution)


# --------------------------------------------------------------------------------------------- checkpoints


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS_FOLDER / f"{CHECKPOINT_PREFIX}{step:06d}"


def complete_checkpoints(output: Path) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first (a folder is renamed into place when complete)."""
    folder = output / CHECKPOINTS_FOLDER
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / PROGRESS_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resume_dir(resume: str, output: Path) -> Path:
    from comfyui_idfuse.models.errors import IDFuseInputError

    if resume == RESUME_LATEST:
        found = complete_checkpoints(output)
        if not found:
            raise IDFuseInputError(f"--resume {RESUME_LATEST}: {output / CHECKPOINTS_FOLDER} holds no complete "
                                   f"checkpoint; start without --resume.")
        return found[-1]
    folder = Path(resume)
    if not (folder / PROGRESS_FILE).is_file():
        raise IDFuseInputError(f"--resume {resume} is not a complete checkpoint folder of this script (no "
                               f"{PROGRESS_FILE}); give a {CHECKPOINTS_FOLDER}/{CHECKPOINT_PREFIX}XXXXXX folder or "
                               f"'{RESUME_LATEST}'.")
    return folder


def _shown(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else repr(value)


def check_resume(saved: dict, current: dict, folder: Path) -> None:
    """Refuse a resumption whose step-changing settings differ, naming each and both values."""
    from comfyui_idfuse.models.errors import IDFuseInputError
    from comfyui_idfuse.models.training.encoder_settings import EncoderTrainingSettings

    mine = EncoderTrainingSettings.from_dict(current["settings"])
    theirs = EncoderTrainingSettings.from_dict(saved["settings"])
    differences = {name: pair for name, pair in mine.step_differences(theirs).items()
                   # the per-process split may change as long as the global batch does not (checked below)
                   if name not in ("batch_size", "gradient_accumulation")}
    if mine.lr_schedule not in ("constant", "constant_with_warmup") and mine.steps != theirs.steps:
        differences["steps"] = (mine.steps, theirs.steps)  # the schedule's length
    for name in ("global_batch", "data_index_hash", "encoder", "prompts", "checkpoint"):
        if current[name] != saved[name]:
            differences[name] = (current[name], saved[name])
    if differences:
        lines = "; ".join(f"{name}: this run {_shown(now)}, the checkpoint {_shown(then)}"
                          for name, (now, then) in differences.items())
        raise IDFuseInputError(f"--resume {folder}: the run being resumed was made with other settings that change "
                               f"what a step computes ({lines}). Use the checkpoint's values, or start a new run "
                               f"(another --output) without --resume.")


# --------------------------------------------------------------------------------------------- the run


class EncoderRun:
    """One training run, on every process: set-up, the loop, checkpoints, export."""

    def __init__(self, args: argparse.Namespace, accelerator):
        from comfyui_idfuse.models.errors import IDFuseInputError, TrainingError
        from comfyui_idfuse.models.training import encoder_data, face_shards

        self.args, self.accelerator = args, accelerator
        self.output = Path(args.output)
        self.data = Path(args.data)
        self.prompts = args.prompt or [DEFAULT_PROMPT]

        # The dataset: its index decides the embedding space and the resolution.
        try:
            shards = face_shards.shard_paths(self.data)
            if not shards:
                raise IDFuseInputError(f"--data {self.data} holds no finished shard (faces-XXXXXX.tar); prepare it "
                                       f"with scripts/prepare_faces.py.")
            self.index = face_shards.read_index(self.data)
        except TrainingError as e:
            raise IDFuseInputError(f"--data {self.data}: {e}") from e
        self.embedding_space = self.index.get("embedding_space")
        identities = encoder_data.identities_of(self.index, self.data)
        self.train_identities, self.held_out = encoder_data.split_held_out(identities, args.validation_identities)
        self.settings = settings_from_args(args, int(self.index.get("resolution") or 512))
        self.clip_uncond = face_shards.clip_unconditional(self.data)
        if self.clip_uncond is None:
            raise IDFuseInputError(f"--data {self.data} has no CLIP vision features: the IDFuse encoder reads the face "
                                   f"crop's CLIP features; prepare the dataset with --clip-vision.")

        # The global batch and this process's share of it.
        s = self.settings
        self.share = encoder_data.ProcessShare(accelerator.process_index, accelerator.num_processes, s.batch_size,
                                               s.gradient_accumulation)
        self.plan = encoder_data.PairPlan(self.train_identities, self.share.global_batch, s.seed, len(self.prompts))
        self.loader = encoder_data.PairLoader(self.data, self.plan, self.share)

    # -- models --

    def load_models(self) -> None:
        from comfyui_idfuse.models.errors import IDFuseError, IDFuseInputError, UnsupportedModelError
        from comfyui_idfuse.nodes.glue import encoder_training

        args = self.args
        try:
            self.model, self.clip, self.vae = encoder_training.checkpoint_models(args.checkpoint)
            self.denoiser = encoder_training.training_denoiser(self.model, self.settings, self.accelerator.device)
        except (UnsupportedModelError, IDFuseError) as e:
            raise IDFuseInputError(f"--checkpoint {args.checkpoint}: {e}") from e
        except RuntimeError as e:  # ComfyUI: "Could not detect model type"
            raise IDFuseInputError(f"--checkpoint {args.checkpoint}: ComfyUI does not recognise it ({e}); give an "
                                   f"SD1.5 or SDXL checkpoint.") from e
        if self.settings.text_attention_on and self.clip is None:
            raise IDFuseInputError(f"--text-attention on needs the checkpoint's text encoder, and --checkpoint "
                                   f"{args.checkpoint} has none; use --text-attention off (the paper's training).")
        self.encoder = self.make_encoder()
        self.prompt_contexts = self.encode_prompts() if self.settings.text_attention_on else None

    def has_vae(self) -> bool:
        return self.vae is not None and getattr(self.vae, "first_stage_model", None) is not None

    def make_encoder(self):
        import torch

        from comfyui_idfuse.models.encoders.convert import idfuse_from_ip_adapter
        from comfyui_idfuse.models.encoders.kinds.idfuse import create_idfuse_encoder
        from comfyui_idfuse.models.encoders.loader import load_id_encoder
        from comfyui_idfuse.models.errors import IDEncoderError, IDFuseInputError
        from comfyui_idfuse.models.faces.types import EMBEDDING_SPACES

        args, family = self.args, self.denoiser.family
        if self.embedding_space not in EMBEDDING_SPACES:
            raise IDFuseInputError(f"--data {self.data}: its face embeddings are of {self.embedding_space!r}, an "
                                   f"embedding space an IDFuse encoder cannot read (known: "
                                   f"{', '.join(EMBEDDING_SPACES)}); prepare the data with a known backend.")
        try:
            if args.init:
                source = load_id_encoder(args.init)
                if source.family != family:
                    raise IDFuseInputError(f"--init {args.init} is for {source.family}, --checkpoint "
                                           f"{args.checkpoint} is {family}: use an IP-Adapter FaceID-Plus file of the "
                                           f"checkpoint's family.")
                encoder = idfuse_from_ip_adapter(source, embedding_space=self.embedding_space, family=family)
            else:
                # Random weights from --seed: the same start whatever the number of processes (DDP broadcasts the
                # main process's weights anyway), and a rerun starts where the first run started.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.settings.seed)
                    encoder = create_idfuse_encoder(
                        family, self.denoiser.hidden_sizes, num_face_tokens=self.settings.num_face_tokens,
                        num_clip_tokens=self.settings.num_clip_tokens, embedding_space=self.embedding_space,
                        **{name: getattr(args, name) for name in ENCODER_SIZE_ARGUMENTS})
        except IDEncoderError as e:
            flag = f"--init {args.init}" if args.init else f"--data {self.data}"
            raise IDFuseInputError(f"{flag}: {e}") from e
        encoder.check_layer_widths(self.denoiser.hidden_sizes)
        return encoder.float().to(self.accelerator.device)

    def encoder_shape(self) -> dict:
        e = self.encoder
        return {"family": e.family, "embedding_space": e.embedding_space, "num_face_tokens": e.face_mapper.num_tokens,
                "num_clip_tokens": e.clip_mapper.num_latents,
                "parameters": sum(p.numel() for p in e.parameters())}

    def encode_prompts(self):
        """Each prompt's text context [P, 77k, ctx] and pooled output [P, 1280] (None for SD1.5), encoded once."""
        return encode_prompts(self.clip, self.prompts)

    # -- batches --

    def pair_batch(self, samples):
        """A PairBatch of the loader's samples: latents scaled for the model (VAE-encoded when the data has none),
        the prompts' contexts for text attention on."""
        from comfyui_idfuse.models.errors import IDFuseInputError
        from comfyui_idfuse.models.training.encoder_trainer import PairBatch
        from comfyui_idfuse.nodes.glue.encoder_training import encode_crops

        if samples.target_latents is not None:
            latents = self.denoiser.process_latent_in(samples.target_latents)
        elif samples.target_images is not None and self.has_vae():
            latents = encode_crops(self.vae, samples.target_images, self.denoiser.process_latent_in)
        else:
            raise IDFuseInputError(f"--data {self.data} has neither latents nor training crops with a VAE to encode "
                                   f"them (--checkpoint {self.args.checkpoint} has no VAE); prepare it with --vae.")
        context = pooled = None
        if self.prompt_contexts is not None:
            contexts, pooled_all = self.prompt_contexts
            context = contexts[samples.prompts]
            pooled = None if pooled_all is None else pooled_all[samples.prompts]
        return PairBatch(sample_ids=samples.sample_ids, reference_faces=samples.reference_faces,
                         reference_clip=None if samples.reference_clip is None else samples.reference_clip.float(),
                         target_latents=latents.float(), prompts_context=context,
                         prompts_pooled=pooled).to(self.accelerator.device)

    # -- metadata --

    def progress(self, step: int) -> dict:
        return {"format": PROGRESS_FORMAT, "step": step, "settings": self.settings.to_dict(),
                "global_batch": self.share.global_batch, "processes": self.share.world_size,
                "data_index_hash": self.index.get("index_hash"), "encoder": self.encoder_shape(),
                "prompts": self.prompts, "checkpoint": Path(self.args.checkpoint).name}

    def export_metadata(self, step: int) -> dict:
        return {"family": self.encoder.family, "embedding_space": self.encoder.embedding_space, "steps": step,
                "data_index_hash": self.index.get("index_hash"), "settings": self.settings.to_dict(),
                "ema": self.ema is not None, "global_batch": self.share.global_batch,
                "processes": self.share.world_size, "checkpoint": Path(self.args.checkpoint).name,
                "init": Path(self.args.init).name if self.args.init else None,
                "identities": len(self.train_identities), "held_out": [i.name for i in self.held_out],
                "prompts": self.prompts if self.settings.text_attention_on else None}

    # -- saving --

    def export(self, step: int) -> None:
        """The encoder (EMA weights when on) as ``<name>.safetensors`` and ``<name>_step_XXXXXX.safetensors``, on
        the main process, each written atomically."""
        if not self.accelerator.is_main_process:
            return
        encoder = self.accelerator.unwrap_model(self.module).encoder
        if self.ema is not None:
            encoder = copy.deepcopy(encoder)
            self.ema.copy_to(encoder)
        metadata = self.export_metadata(step)
        encoder.save(self.output / f"{self.args.name}_step_{step:06d}.safetensors", training=metadata)
        encoder.save(self.output / f"{self.args.name}.safetensors", training=metadata)
        log.info("Exported the encoder at step %d to %s", step, self.output / f"{self.args.name}.safetensors")

    def weights_fingerprints(self) -> list[str]:
        """Every process's fingerprint of its trainable weights (the first 8 bytes of a SHA-256 of their bytes): the
        processes must agree (DDP keeps them equal), which each checkpoint checks."""
        import hashlib

        import torch

        digest = hashlib.sha256()
        for name, weight in sorted(self.accelerator.unwrap_model(self.module).encoder.state_dict().items()):
            digest.update(name.encode())
            digest.update(weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        mine = torch.tensor([int.from_bytes(digest.digest()[:8], "big", signed=True)], dtype=torch.int64)
        every = self.accelerator.gather(mine.to(self.accelerator.device)).cpu().tolist()
        return [f"{value & (2 ** 64 - 1):016x}" for value in every]

    def save_checkpoint(self, step: int) -> Path:
        """accelerate's state (weights, optimiser, scheduler, EMA, RNG) and the progress file, in a temporary folder
        renamed into place once complete; then the encoder; then old checkpoints pruned."""
        accelerator, final = self.accelerator, checkpoint_dir(self.output, step)
        temporary = final.with_name(f".{final.name}.partial")
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        accelerator.wait_for_everyone()
        fingerprints = self.weights_fingerprints()
        if len(set(fingerprints)) > 1:
            from comfyui_idfuse.models.errors import TrainingError

            raise TrainingError(f"Step {step}: the processes hold different encoder weights ({fingerprints}); the "
                                f"distributed set-up is broken (check accelerate config). Nothing was saved.")
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            progress = {**self.progress(step), "weights_fingerprints": fingerprints}
            (temporary / PROGRESS_FILE).write_text(json.dumps(progress, indent=1), encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            log.info("Saved checkpoint %s", final)
            self.export(step)
            keep = self.args.keep_checkpoints
            for old in complete_checkpoints(self.output)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.saved_step = step
        return final

    # -- validation --

    def scoring_backend(self):
        """The dataset's own face backend, to score the validation images, when it needs no model folder (dlib's
        models ship in a package); an insightface pack's folder is not given to training, so then no scores."""
        if not hasattr(self, "_scoring_backend"):
            from comfyui_idfuse.models import faces
            from comfyui_idfuse.models.errors import FaceAnalysisError

            name, self._scoring_backend = self.index.get("backend"), None
            try:
                kind = faces.backend_kind(name)
            except FaceAnalysisError:
                kind = None
            if kind is None or kind.model_folder:
                main_log.info("Validation images are not scored: the dataset's face backend %r is not built in", name)
            else:
                self._scoring_backend = faces.load_backend(name, lambda folder: [], "CPU", 640)
        return self._scoring_backend

    def validate(self, step: int) -> None:
        if not self.held_out:
            return
        if self.clip is None or not self.has_vae():
            main_log.info("Validation at step %d skipped: --checkpoint %s has no %s", step, self.args.checkpoint,
                     "text encoder" if self.clip is None else "VAE")
            return
        if not self.accelerator.is_main_process:
            return
        from comfyui_idfuse.models.training import encoder_data
        from comfyui_idfuse.nodes.glue.encoder_validation import sample_reference, validation_grid

        references = [sample_reference(s, 0, self.clip_uncond)
                      for s in encoder_data.read_identities(self.data, [i.name for i in self.held_out])]
        encoder = self.accelerator.unwrap_model(self.module).encoder
        grid, scores = validation_grid(self.model, self.clip, self.vae, encoder, references, self.prompts,
                                       self.settings.seed, self.args.validation_sampling_steps,
                                       self.args.validation_size, backend=self.scoring_backend())
        tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("validation", grid[0].clamp(0, 1).numpy(), step, dataformats="HWC")
        if scores:
            self.accelerator.log({"validation/identity_score": sum(scores) / len(scores)}, step=step)

    # -- the loop --

    def prepare(self) -> int:
        """accelerate-prepared module, optimiser and scheduler (and EMA); restores a checkpoint; returns the step."""
        import torch

        from comfyui_idfuse.models.training.encoder_trainer import EncoderEMA, EncoderTraining
        from comfyui_idfuse.models.training.loop import make_lr_scheduler

        s, accelerator = self.settings, self.accelerator
        module = EncoderTraining(self.encoder, self.denoiser, s, self.clip_uncond)
        optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=s.learning_rate, weight_decay=s.weight_decay)
        scheduler = make_lr_scheduler(s.lr_schedule, optimizer, s.warmup_steps, s.steps) or \
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        self.module, self.optimizer, self.scheduler = accelerator.prepare(module, optimizer, scheduler)
        self.ema = None
        if s.ema_decay > 0:
            self.ema = EncoderEMA(self.encoder, s.ema_decay)
            accelerator.register_for_checkpointing(self.ema)
        self.saved_step = -1
        if not self.args.resume:
            return 0
        folder = resume_dir(self.args.resume, self.output)
        saved = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
        check_resume(saved, self.progress(saved["step"]), folder)
        accelerator.load_state(str(folder))
        self.saved_step = int(saved["step"])
        main_log.info("Resumed %s at step %d", folder, self.saved_step)
        return self.saved_step

    def train(self) -> int:
        """Run to ``settings.steps``; returns the process exit code."""
        import torch
        from tqdm import tqdm

        from comfyui_idfuse.models.errors import NonFiniteLossError

        s, accelerator, args = self.settings, self.accelerator, self.args
        self.load_models()
        with self.denoiser:
            start = self.prepare()
            accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config(self.progress(start)))
            parameters = accelerator.unwrap_model(self.module).trainable_parameters()
            main_log.info("Training %s from step %d to %d: %d identities (%d held out), global batch %d = %d x %d "
                     "processes x %d accumulation", self.encoder.family, start, s.steps, len(self.plan),
                     len(self.held_out), self.share.global_batch, s.batch_size, self.share.world_size,
                     s.gradient_accumulation)
            progress = tqdm(total=s.steps, initial=start, disable=not accelerator.is_local_main_process,
                            desc="encoder training", dynamic_ncols=True)
            batches = self.loader(start, s.steps)
            step, window = start, Window()
            try:
                while step < s.steps:
                    step_start = time.perf_counter()
                    losses = []
                    for _micro in range(s.gradient_accumulation):
                        waited = time.perf_counter()
                        batch = self.pair_batch(next(batches))
                        window.data_time += time.perf_counter() - waited
                        with accelerator.accumulate(self.module):
                            loss = self.module(batch, step)
                            every = accelerator.gather(loss.detach().float().reshape(1))
                            if not bool(torch.isfinite(every).all()):
                                raise NonFiniteLossError(step, "loss", {f"process {i}": float(v)
                                                                        for i, v in enumerate(every)})
                            losses.append(float(every.mean()))
                            accelerator.backward(loss)
                            if accelerator.sync_gradients:
                                norm = accelerator.clip_grad_norm_(parameters, s.max_grad_norm or math.inf)
                                window.grad_norm = float(norm)
                                if not math.isfinite(window.grad_norm) and s.mixed_precision != "fp16":
                                    raise NonFiniteLossError(step, "gradient norm", {"loss": losses[-1]})
                            self.optimizer.step()
                            self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
                    if self.ema is not None:
                        self.ema.update(accelerator.unwrap_model(self.module).encoder)
                    step += 1
                    window.add(sum(losses) / len(losses), time.perf_counter() - step_start)
                    progress.update(1)
                    progress.set_postfix(loss=f"{window.last_loss:.4f}")
                    if step % max(1, args.log_every) == 0 or step == s.steps:
                        self.log_window(step, window)
                        window = Window()
                    if s.checkpoint_every and step % s.checkpoint_every == 0 and step < s.steps:
                        self.save_checkpoint(step)
                    if s.validation_every and step % s.validation_every == 0:
                        self.validate(step)
                self.save_checkpoint(step)
            except KeyboardInterrupt:
                progress.close()
                log.warning("Interrupted: saving the state and the encoder at step %d (the last finished step)", step)
                if step > self.saved_step:
                    self.save_checkpoint(step)
                accelerator.end_training()
                return INTERRUPTED_EXIT_CODE
            except NonFiniteLossError:
                progress.close()
                last = complete_checkpoints(self.output)
                log.error("Training stopped at step %d; the last checkpoint (%s) is kept: resume from it with a lower "
                          "--learning-rate or --mixed-precision no", step, last[-1] if last else "none")
                raise
            finally:
                batches.close()
            progress.close()
        accelerator.end_training()
        main_log.info("Finished %d steps; encoder: %s", step, self.output / f"{args.name}.safetensors")
        return 0

    def log_window(self, step: int, window: Window) -> None:
        values = {"loss": window.mean_loss, "lr": float(self.scheduler.get_last_lr()[0]),
                  "grad_norm": window.grad_norm, "data_wait_share": window.data_share}
        self.accelerator.log(values, step=step)
        log.debug("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))


@dataclasses.dataclass
class Window:
    """What happened since the last tracker line."""

    losses: list = dataclasses.field(default_factory=list)
    step_time: float = 0.0
    data_time: float = 0.0
    grad_norm: float = float("nan")

    def add(self, loss: float, seconds: float) -> None:
        self.losses.append(loss)
        self.step_time += seconds

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    @property
    def data_share(self) -> float:
        """Time waiting for data (reading, decoding, VAE-encoding) / step time."""
        return self.data_time / self.step_time if self.step_time > 0 else 0.0


def tracker_config(progress: dict) -> dict:
    """Scalars only (TensorBoard's hyperparameters)."""
    flat = {f"settings/{k}": v for k, v in progress["settings"].items()}
    flat.update({k: v for k, v in progress.items() if isinstance(v, (int, float, str, bool)) and k != "format"})
    flat.update({f"encoder/{k}": v for k, v in progress["encoder"].items()})
    return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}


def encode_prompts(clip, prompts: list[str]):
    """Each prompt's text context [P, 77k, ctx] and pooled output [P, 1280] (SDXL; None for SD1.5) through ComfyUI's
    CLIP, once for the run."""
    import torch

    from comfyui_idfuse.models.errors import IDFuseInputError

    contexts, pooled = [], []
    for prompt in prompts:
        context, pool = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        contexts.append(context[0].float())
        pooled.append(None if pool is None else pool.reshape(-1).float())
    if len({tuple(c.shape) for c in contexts}) > 1:
        raise IDFuseInputError(f"--prompt: the prompts encode to contexts of different lengths "
                               f"({sorted({c.shape[0] for c in contexts})} tokens); keep each under 75 tokens.")
    with torch.inference_mode(False):
        stacked = torch.stack(contexts).clone()
        pooled_all = None if any(p is None for p in pooled) else torch.stack(pooled).clone()
    return stacked, pooled_all


# --------------------------------------------------------------------------------------------- entry


def _interrupt_on_sigterm() -> None:
    """A cluster's SIGTERM (pre-emption, a job's time limit) stops the run as Ctrl-C does: state saved first."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    _, _ = _imports()
    from comfyui_idfuse.models.errors import IDFuseError

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation,
        log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(output),
                                                                     logging_dir=str(output / "logs")),
        cpu=args.cpu, step_scheduler_with_optimizer=False)
    # After the Accelerator (which picks this process's GPU) and before ComfyUI picks its device.
    host.comfy(args.comfyui, cpu=accelerator.device.type == "cpu")
    _interrupt_on_sigterm()
    try:
        return EncoderRun(args, accelerator).train()
    except IDFuseError as e:
        log.error("%s", e)
        return 2


def _show_info_lines() -> None:
    """Run from a shell: INFO lines (checkpoints, summaries) on stderr. (ComfyUI may have set up the root logger.)"""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    root.setLevel(logging.INFO)


if __name__ == "__main__":
    _show_info_lines()
    sys.exit(main())
