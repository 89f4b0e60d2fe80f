"""The trainer nodes' widgets, made from models/training/settings.py (defaults, ranges), and their
values turned back into TrainingSettings fields."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ...models.errors import IDFuseInputError, TrainingError
from ...models.training.settings import DEFAULTS, setting_range
from .lora_files import LORA_TARGET_CHOICES

# UI choice -> downscales of the loss layers (None: every cross-attention layer).
LOSS_LAYER_CHOICES: dict[str, tuple[int, ...] | None] = {
    "2, 4": (2, 4), "4": (4,), "2": (2,), "1, 2, 4": (1, 2, 4), "all": None}


def _choice_of(choices: Mapping[str, object], value: object, setting: str) -> str:
    labels = [label for label, meaning in choices.items() if meaning == value]
    assert labels, f"the default {setting} {value!r} is none of the choices {list(choices)}"
    return labels[0]


def widget_default(name: str):
    """The default of a node input as its widget shows it (the input names of both trainer nodes)."""
    if name == "loss_layers":
        return _choice_of(LOSS_LAYER_CHOICES, DEFAULTS.loss_downscales, "loss_downscales")
    if name == "lora_targets":
        return _choice_of(LORA_TARGET_CHOICES, DEFAULTS.lora_targets, "lora_targets")
    if name in ("templates", "sample_prompts"):
        return "\n".join(getattr(DEFAULTS, name))
    return getattr(DEFAULTS, name)


def number_input(name: str, tooltip: str, **options) -> tuple:
    """An INT or FLOAT widget with the setting's default and range."""
    default = widget_default(name)
    kind = "FLOAT" if isinstance(default, float) else "INT"
    return kind, {"default": default, **setting_range(name), **options, "tooltip": tooltip}


def choice_input(name: str, choices: Sequence[str], tooltip: str) -> tuple:
    default = widget_default(name)
    assert default in choices, f"the default {name} {default!r} is none of the choices {list(choices)}"
    return list(choices), {"default": default, "tooltip": tooltip}


def boolean_input(name: str, tooltip: str) -> tuple:
    return "BOOLEAN", {"default": widget_default(name), "tooltip": tooltip}


def text_input(name: str, tooltip: str, **options) -> tuple:
    return "STRING", {"default": widget_default(name), **options, "tooltip": tooltip}


def parse_loss_layers(choice: str) -> tuple[int, ...] | None:
    if choice not in LOSS_LAYER_CHOICES:
        raise TrainingError(f"loss_layers '{choice}' is not one of {', '.join(LOSS_LAYER_CHOICES)}.")
    return LOSS_LAYER_CHOICES[choice]


def parse_lora_targets(choice: str) -> tuple[str, ...]:
    if choice not in LORA_TARGET_CHOICES:
        raise TrainingError(f"lora_targets '{choice}' is not one of {', '.join(LORA_TARGET_CHOICES)}.")
    return LORA_TARGET_CHOICES[choice]


def parse_templates(text: str) -> tuple[str, ...]:
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        raise TrainingError("templates is empty; write at least one prompt with {} for the placeholder, e.g. "
                            "'a photo of the face of {}'.")
    return lines


def parse_sample_prompts(text: str, placeholder: str | None = None) -> tuple[str, ...]:
    """Sample prompts, one per line (empty: no sample images). Each must name the identity, by the
    placeholder word or by {}. Without ``placeholder`` (Training Options does not know it) the lines as
    written; with it (the run, before training) the prompts as rendered, {} replaced by the placeholder,
    and a line naming neither is refused."""
    import re  # here: the rest of this module has no use for it

    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if placeholder is None:
        return tuple(line for _number, line in lines)
    word = re.compile(rf"(?<![\w]){re.escape(placeholder)}(?![\w])", re.IGNORECASE)
    prompts = []
    for number, line in lines:
        prompt = line.replace("{}", placeholder)
        if not word.search(prompt):
            raise IDFuseInputError(
                f"sample_prompts line {number} '{line}' names neither the placeholder '{placeholder}' nor {{}}; "
                f"write one of them where the person belongs, e.g. 'a photo of {placeholder} as an astronaut' or "
                f"'{{}} as an astronaut, oil painting'.")
        prompts.append(prompt)
    return tuple(prompts)


def check_generator_width(width: int, heads: int) -> int:
    if width % heads:
        raise IDFuseInputError(f"generator_width {width} must be a multiple of the generator's {heads} attention "
                               f"heads; use e.g. {max(heads, width // heads * heads)}.")
    return width


def available_optimizers() -> list[str]:
    """The optimisers that can run on this machine, for the widget (AdamW8bit only with CUDA and bitsandbytes)."""
    from ...models.training import optimizers
    return optimizers.available_optimizers()


def check_optimizer(name: str) -> str:
    """``name`` if that optimiser can run here; else a TrainingError saying why and what to choose (a saved
    workflow may name one this machine cannot run)."""
    from ...models.training import optimizers
    optimizers.optimizer_kind(name).require()
    return name
