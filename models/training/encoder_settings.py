"""The settings of an ID-encoder training run (Infinite-ID's identity-enhanced training): every default,
range and choice is written here once; the training step, the accelerate script, its docs and the
tests read them from here (docs/METHOD.md §2.9 says why each default is what it is)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import TrainingSettingsError
from .settings import LR_SCHEDULES, _ranged

# "off": the paper's identity-enhanced training (the UNet's text cross-attention is not computed, so the ID
# tokens must carry the whole identity); "on": text + ID attention summed, as IP-Adapter trains (comparison).
TEXT_ATTENTION_MODES = ("off", "on")
# accelerate's names (Accelerator(mixed_precision=...)), so the script passes the setting through unchanged.
MIXED_PRECISIONS = ("no", "bf16", "fp16")
# What each mixed_precision means for ComfyUI's UNet (models/training/settings.TRAINING_DTYPES names).
TRAINING_DTYPE_OF = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Settings that change what one step computes: a resumed run must have the same ones (the rest, such as
# the number of steps or how often to save, may change between a run and its resumption).
STEP_SETTINGS = ("learning_rate", "weight_decay", "lr_schedule", "warmup_steps", "text_attention",
                 "min_snr_gamma", "id_dropout", "ema_decay", "train_clip_mapper", "mixed_precision", "seed",
                 "batch_size", "gradient_accumulation", "resolution", "max_grad_norm", "num_face_tokens",
                 "num_clip_tokens")


@dataclass(frozen=True)
class EncoderTrainingSettings:
    # AdamW with the paper's recipe (lr 1e-4, weight decay 0.01).
    learning_rate: float = _ranged(1e-4, 1e-7, 1.0)
    weight_decay: float = _ranged(0.01, 0.0, 1.0)
    lr_schedule: str = "constant"  # one of settings.LR_SCHEDULES (the token trainer's schedules)
    warmup_steps: int = _ranged(0, 0, 1_000_000)
    text_attention: str = "off"  # TEXT_ATTENTION_MODES
    min_snr_gamma: float = _ranged(0.0, 0.0, 100.0)  # 0 = plain diffusion loss
    # Share of samples whose ID input is replaced by the negative input IDFuse uses at inference (zero face
    # embedding, the unconditional image's CLIP features), so classifier-free guidance has an unconditional
    # ID branch the encoder has learned. 0.05: IP-Adapter FaceID's training rate, the recipe whose negative
    # convention the inference follows; small enough that 95 % of the samples train the identity.
    id_dropout: float = _ranged(0.05, 0.0, 1.0)
    ema_decay: float = _ranged(0.0, 0.0, 0.99999)  # 0 = no EMA; e.g. 0.999 for long runs
    train_clip_mapper: bool = True  # False: the CLIP mapper stays as initialised (e.g. from a FaceID-Plus file)
    mixed_precision: str = "no"  # MIXED_PRECISIONS
    gradient_checkpointing: bool = False  # recompute the UNet's layers in the backward pass (less memory)
    seed: int = _ranged(0, 0, 2 ** 32 - 1)
    # Per process; the global batch is batch_size × processes × gradient_accumulation.
    batch_size: int = _ranged(4, 1, 1024)
    gradient_accumulation: int = _ranged(1, 1, 1024)
    steps: int = _ranged(20_000, 1, 10_000_000)  # optimiser steps
    resolution: int = _ranged(512, 64, 2048, 64)  # training crops (pixels); 1024 suits SDXL
    # Clip the trainable weights' gradient norm (diffusers' training scripts' default); 0 = no clipping.
    max_grad_norm: float = _ranged(1.0, 0.0, 1e6)
    checkpoint_every: int = _ranged(1000, 0, 10_000_000)  # 0 = only at the end
    validation_every: int = _ranged(1000, 0, 10_000_000)  # 0 = never
    # A new (random) encoder's tokens: the IDFuse kind's defaults (models/encoders/kinds/idfuse.py).
    num_face_tokens: int = _ranged(4, 1, 64)
    num_clip_tokens: int = _ranged(16, 1, 256)

    def __post_init__(self) -> None:
        choices = {"text_attention": TEXT_ATTENTION_MODES, "mixed_precision": MIXED_PRECISIONS,
                   "lr_schedule": LR_SCHEDULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainingSettingsError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}; "
                                            f"pick one of those.")
        for spec in fields(self):
            limits, value = spec.metadata, getattr(self, spec.name)
            if limits and not limits["min"] <= value <= limits["max"]:
                raise TrainingSettingsError(f"{spec.name} {value} is outside {limits['min']}..{limits['max']}; "
                                            f"set a value in that range.")

    @property
    def text_attention_on(self) -> bool:
        return self.text_attention == "on"

    @property
    def training_dtype(self) -> str:
        """mixed_precision in the token trainer's terms (models/training/settings.TRAINING_DTYPES)."""
        return TRAINING_DTYPE_OF[self.mixed_precision]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EncoderTrainingSettings:
        """Settings from ``to_dict``'s output (metadata, a resumed run); unknown names are refused, missing
        ones take their defaults (settings added after the run was saved)."""
        known = {spec.name for spec in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingSettingsError(f"Unknown encoder-training settings {unknown}; known: {sorted(known)}. "
                                        f"Update the pack, or remove them.")
        return cls(**data)

    def step_differences(self, other: EncoderTrainingSettings) -> dict[str, tuple]:
        """The settings that change what a step computes and differ from ``other``: name -> (self, other)."""
        return {name: (getattr(self, name), getattr(other, name)) for name in STEP_SETTINGS
                if getattr(self, name) != getattr(other, name)}


ENCODER_DEFAULTS = EncoderTrainingSettings()


def encoder_setting_range(name: str) -> dict:
    """``{"min", "max"[, "step"]}`` of a numeric encoder-training setting ({} for the others)."""
    (spec,) = (f for f in fields(EncoderTrainingSettings) if f.name == name)
    return dict(spec.metadata)
