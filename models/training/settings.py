"""The settings of an identity-training run: every default is written here once, and the trainer
nodes, their docs and the tests read it from here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_TEMPLATES = (
    "a photo of the face of {}",
    "a close-up photo of the face of {}",
    "a cropped photo of the face of {}",
    "a good photo of the face of {}",
)
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
TRAINING_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Steps in a row that float16 loss scaling may skip for overflowing gradients before training stops:
# each skip halves the scale, so by then the gradients overflow at a scale of 2**-4 or less.
MAX_SKIPPED_STEPS = 20


@dataclass(frozen=True)
class TrainingSettings:
    placeholder: str
    initializer: str = "person"
    num_stages: int = 5
    steps: int = 600
    learning_rate: float = 1e-4
    attention_weight: float = 0.003
    attention_mode: str = "face_mask"
    loss_downscales: tuple[int, ...] = (2, 4)
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ("to_k", "to_v")
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    augmentation: str = "flip"
    resolution: int = 512
    batch_size: int = 1
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    training_dtype: str = "auto"
    seed: int = 0
    checkpoint_every: int = 100
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_snr_gamma: float = 0.0
    detach_reference: bool = True
    generator_width: int = 256

    def to_dict(self) -> dict:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
