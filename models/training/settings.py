"""The settings of an identity-training run: every default and every range is written here once, and
the trainer nodes, their docs and the tests read them from here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

DEFAULT_TEMPLATES = (
    "a photo of the face of {}",
    "a close-up photo of the face of {}",
    "a cropped photo of the face of {}",
    "a good photo of the face of {}",
)
DEFAULT_SAVE_NAME = "idfuse_identity"
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
TRAINING_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Optimiser names (models/training/optimizers: one file per kind); the node offers those that can run here.
OPTIMIZERS = ("AdamW", "AdamW8bit", "Prodigy")
# Steps in a row that float16 loss scaling may skip for overflowing gradients before training stops:
# each skip halves the scale, so by then the gradients overflow at a scale of 2**-4 or less.
MAX_SKIPPED_STEPS = 20
# The trainer measures each loss term's share of the token gradient at step 1 and every this many steps
# after (one extra backward pass per term on those steps only); the report and the loss plot show it.
GRADIENT_SHARE_EVERY = 10
# Default of reference_loss_scale (see TrainingSettings); runs before the setting existed used 1.
REFERENCE_LOSS_SCALE = 1000.0


def _ranged(default, minimum, maximum, step=None):
    """A numeric setting with the range (and widget step) its input allows."""
    limits = {"min": minimum, "max": maximum}
    if step is not None:
        limits["step"] = step
    return field(default=default, metadata=limits)


@dataclass(frozen=True)
class TrainingSettings:
    placeholder: str = "sks"
    initializer: str = "person"
    num_stages: int = _ranged(5, 1, 20)
    steps: int = _ranged(600, 1, 100000)
    learning_rate: float = _ranged(1e-4, 1e-7, 1.0, 1e-5)
    attention_weight: float = _ranged(0.003, 0.0, 1000.0, 0.001)
    attention_mode: str = "face_mask"
    loss_downscales: tuple[int, ...] | None = (2, 4)  # None: every cross-attention layer
    lora_rank: int = _ranged(0, 0, 256)
    lora_targets: tuple[str, ...] = ("to_k", "to_v")
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    augmentation: str = "flip"
    resolution: int = _ranged(512, 64, 2048, 64)
    batch_size: int = _ranged(1, 1, 64)
    gradient_accumulation: int = _ranged(1, 1, 64)
    gradient_checkpointing: bool = False
    training_dtype: str = "auto"
    seed: int = _ranged(0, 0, 0xFFFFFFFF)
    checkpoint_every: int = _ranged(100, 0, 100000)
    lr_schedule: str = "constant"
    warmup_steps: int = _ranged(0, 0, 100000)
    min_snr_gamma: float = _ranged(0.0, 0.0, 100.0, 0.5)
    detach_reference: bool = True
    generator_width: int = _ranged(256, 16, 4096, 16)
    # The reference_prompt term enters the loss as attention_weight × this × its MSE: an MSE between attention
    # probabilities of ~0.01-0.05 that start equal is orders of magnitude smaller than the face_mask term, so
    # at the same λ it would give the tokens almost no gradient (docs/METHOD.md: the measured shares).
    reference_loss_scale: float = _ranged(REFERENCE_LOSS_SCALE, 0.0, 1e6, 1.0)
    optimizer: str = "AdamW"
    # Sample images during training: each prompt (with the placeholder, or {} for it) rendered through the
    # token path every sample_every steps, fixed seed; none = no samples. sample_every also sets how often
    # the validation loss is measured (0 = neither).
    sample_prompts: tuple[str, ...] = ()
    sample_every: int = _ranged(100, 0, 100000)
    sample_steps: int = _ranged(12, 1, 100)
    sample_size: int = _ranged(512, 256, 2048, 64)
    # The diffusion loss of a held-out photo (the validation_images input, else the last photo, then left
    # out of training) at fixed timesteps and noise, every sample_every steps.
    validation_loss: bool = False

    def to_dict(self) -> dict:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


DEFAULTS = TrainingSettings()


def setting_range(name: str) -> dict:
    """``{"min", "max"[, "step"]}`` of a numeric setting ({} for the others)."""
    (spec,) = (f for f in fields(TrainingSettings) if f.name == name)
    return dict(spec.metadata)
