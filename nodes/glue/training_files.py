"""Where IDFuse Train Identity writes, and what it resumes from."""

from __future__ import annotations

import os
import re
from pathlib import Path

import folder_paths

from ...models.errors import IDFuseInputError, TrainingError
from ...models.files import temporary_name
from ...models.tokens.format import IDTokens, load_id_tokens
from ...models.training.losses import REFERENCE_MODES
from ...models.training.settings import TrainingSettings
from .folders import ID_TOKENS_FOLDER, default_folder
from .training_options import LOSS_LAYER_CHOICES

TRAINER_FORMAT = "idfuse.trainer"
NO_RESUME = "none"
# Letters and digits (any script), '_', '-', '.' and inner spaces; checked in OutputFiles.
_SAVE_NAME = re.compile(r"^[\w\-. ]+$")
SAVE_NAME_RULE = "letters, digits, '_', '-', '.' and spaces, not starting with '.' or a space, not ending with a space"
# A file name (one path component) may have 255 bytes on the usual file systems (ext4, APFS, tmpfs;
# NTFS counts 255 UTF-16 units, which UTF-8 bytes never undercount).
MAX_FILE_NAME_BYTES = 255


def check_save_name(save_name: str, final_names: list[str]) -> None:
    """Refuses a save_name that is not a plain file name, or that makes a file name (the files in
    ``final_names`` or their temporary files) longer than a file system allows, before any work."""
    if not save_name.strip():
        raise IDFuseInputError("save_name is empty; give the identity a file name such as 'my_person'.")
    if save_name != save_name.strip():
        raise IDFuseInputError(f"save_name '{save_name}' starts or ends with a space; remove it (use "
                               f"{SAVE_NAME_RULE}).")
    if not _SAVE_NAME.match(save_name) or save_name.startswith("."):
        raise IDFuseInputError(f"save_name '{save_name}' is not a plain file name; use {SAVE_NAME_RULE}, without "
                               f"folders.")
    names = [*final_names, *(temporary_name(n) for n in final_names)]
    longest = max(names, key=lambda n: len(os.fsencode(n)))
    if len(os.fsencode(longest)) > MAX_FILE_NAME_BYTES:
        size = len(os.fsencode(save_name))
        allowed = MAX_FILE_NAME_BYTES - (len(os.fsencode(longest)) - size)
        pattern = longest.replace(save_name, "<save_name>", 1)
        raise IDFuseInputError(
            f"save_name is too long: it is {size} bytes (UTF-8) and the trainer writes files named up to "
            f"'{pattern}', longer than the {MAX_FILE_NAME_BYTES} bytes a file name may have. Use a save_name of at "
            f"most {allowed} bytes: {allowed} ASCII characters, or {allowed // 3} Chinese, Japanese or Korean "
            f"characters (3 bytes each).")


class OutputFiles:
    """Where one identity's files go: tokens (+ training state + report + the folder of sample images) and
    the LoRA."""

    def __init__(self, save_name: str):
        tokens_dir = Path(default_folder(ID_TOKENS_FOLDER))
        self.tokens = tokens_dir / f"{save_name}.safetensors"
        self.state = tokens_dir / f"{save_name}.trainstate"
        self.report = tokens_dir / f"{save_name}.report.json"
        self.samples = tokens_dir / f"{save_name}.samples"  # step_000400.png, one per sample round
        self.lora = Path(folder_paths.get_folder_paths("loras")[0]) / f"{save_name}.safetensors"
        check_save_name(save_name, [p.name for p in (self.tokens, self.state, self.report, self.samples, self.lora)])

    def check_free(self, resume_path: str | None, with_lora: bool) -> None:
        resuming_this = resume_path is not None and os.path.abspath(resume_path) == os.path.abspath(self.tokens)
        if resuming_this:
            return
        taken = [p for p in ([self.tokens] + ([self.lora] if with_lora else [])) if p.exists()]
        if taken:
            raise TrainingError(f"save_name '{self.tokens.stem}': {', '.join(str(p) for p in taken)} already exists. "
                                f"Choose another save_name, or pick {self.tokens.name} in resume_from to continue "
                                f"training it.")


def resume_source(resume_from: str) -> tuple[str | None, IDTokens | None]:
    if resume_from == NO_RESUME:
        return None, None
    path = folder_paths.get_full_path(ID_TOKENS_FOLDER, resume_from)
    if path is None:
        raise TrainingError(f"resume_from '{resume_from}' is not in models/idfuse/tokens; refresh the page.")
    return path, load_id_tokens(path)


# Settings that change what step k does (its photos and prompts, its random draws, its loss, its learning
# rate, the trained parameters): a resumed run must have the first run's. Not among them: steps (resuming
# is for training further; the LR schedule keeps the first run's total, see IdentityTrainer), and what
# changes only speed, memory or rounding (checkpoint_every, gradient_checkpointing, training_dtype).
RESUME_MUST_MATCH = (
    "placeholder", "initializer", "num_stages", "generator_width", "lora_rank", "lora_targets", "templates",
    "seed", "learning_rate", "attention_weight", "attention_mode", "loss_downscales", "detach_reference",
    "batch_size", "gradient_accumulation", "lr_schedule", "warmup_steps", "min_snr_gamma", "resolution",
    "augmentation", "reference_loss_scale", "optimizer", "validation_loss",
)
# validation_loss must match: without validation_images it holds the last photo out of training.
RESUME_MAY_DIFFER = ("steps", "checkpoint_every", "gradient_checkpointing", "training_dtype", "sample_prompts",
                     "sample_every", "sample_steps", "sample_size")
# What runs made before a setting existed did, where that is not the setting's default now.
_BEFORE_THE_SETTING = {"reference_loss_scale": 1.0}
# Settings only the reference_prompt term reads: other modes (attention_mode matches first) may differ.
_REFERENCE_ONLY = ("detach_reference", "reference_loss_scale")
# The node input of a setting where the names differ.
_INPUT_NAMES = {"loss_downscales": "loss_layers"}


def _shown(name: str, value) -> str:
    """A setting's value as its widget shows it (loss_layers by its choice)."""
    if name == "loss_downscales":
        labels = [label for label, v in LOSS_LAYER_CHOICES.items() if (None if v is None else list(v)) == value]
        return repr(labels[0]) if labels else repr(value)
    return repr(value)


def check_resumable(tokens: IDTokens, settings: TrainingSettings, family: str) -> dict:
    """The saved run's training metadata, if this run may resume it: refuses any setting of
    RESUME_MUST_MATCH that differs, naming the setting, both values and the fix."""
    training = tokens.training
    if training.get("format") != TRAINER_FORMAT or not tokens.generator:
        raise TrainingError(f"resume_from {tokens.source}: the file holds no trainer state (it was not made by IDFuse "
                            f"Train Identity, or without its generator); start a new run.")
    tokens.check_family(family)
    previous, current = training["settings"], settings.to_dict()
    defaults = {**TrainingSettings().to_dict(), **_BEFORE_THE_SETTING}
    for name in RESUME_MUST_MATCH:
        saved = previous.get(name, defaults[name])  # older files lack settings added since
        unused = name in _REFERENCE_ONLY and current["attention_mode"] not in REFERENCE_MODES
        if saved != current[name] and not unused:
            shown = _INPUT_NAMES.get(name, name)
            raise TrainingError(
                f"resume_from {tokens.source} was trained with {shown} = {_shown(name, saved)}, this run has "
                f"{_shown(name, current[name])}; a resumed run must repeat what the first run would have done. Set "
                f"{shown} to {_shown(name, saved)} as in that run to resume it, or set resume_from to "
                f"'{NO_RESUME}' (and another save_name) to start a new run with {_shown(name, current[name])}.")
    return training
