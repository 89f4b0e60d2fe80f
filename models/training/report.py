"""The report of a training run (also saved as <save_name>.report.json): settings, steps, final
losses, each loss term's value and share of the gradient, the validation loss at each measurement,
the face share of the placeholder's attention before and after, float16 loss scaling."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .settings import TrainingSettings
from .token_trainer import Evaluation, IdentityTrainer, LossHistory, StepLosses, gradient_shares

FINAL_LOSS_STEPS = 10


def final_losses(steps: Sequence[StepLosses], last: int = FINAL_LOSS_STEPS) -> dict[str, float] | None:
    """Mean losses of the last steps (single steps are noisy: each has its own random timestep)."""
    recent = steps[-last:]
    if not recent:
        return None
    return {"diffusion": sum(s.diffusion for s in recent) / len(recent),
            "attention": sum(s.attention for s in recent) / len(recent), "over_steps": len(recent)}


def loss_terms(steps: Sequence[StepLosses], weights: dict[str, float], last: int = FINAL_LOSS_STEPS) -> dict | None:
    """What each term of the loss contributes: its weight in the loss (``weights``: attention_weight ×
    the term's own factor), its mean value over the last steps, and the share of the trained
    parameters' gradient it gives (its gradient norm over the sum of the terms' norms, per parameter
    group) at the first measured step and over the last measured ones. The attention terms' norms
    are of weight × term, as they enter the step."""
    if not steps:
        return None
    recent = steps[-last:]
    names = sorted({name for s in recent for name in s.terms})
    measured = [s for s in steps if s.gradient_norms]
    report = {
        "weights": {"diffusion": 1.0, **weights},
        "values": {"diffusion": sum(s.diffusion for s in recent) / len(recent),
                   **{n: sum(s.terms.get(n, 0.0) for s in recent) / len(recent) for n in names},
                   "over_steps": len(recent)},
        "gradient_measured_steps": [s.step for s in measured],
    }
    if measured:
        latest = measured[-last:]
        report["gradient_norm"] = {"first": measured[0].gradient_norms, "last": _mean_norms(latest)}
        report["gradient_share"] = {
            "first": {group: gradient_shares(norms) for group, norms in measured[0].gradient_norms.items()},
            "last": {group: gradient_shares(norms) for group, norms in _mean_norms(latest).items()},
            "over_measurements": len(latest)}
    return report


def validation_loss(history: LossHistory) -> dict[str, list] | None:
    """The held-out photo's loss at each measured step (record_validation); None when never measured."""
    if not history.validation:
        return None
    # null for a value that is not finite (JSON has no NaN)
    return {"steps": [step for step, _ in history.validation],
            "values": [value if math.isfinite(value) else None for _, value in history.validation]}


def _mean_norms(steps: Sequence[StepLosses]) -> dict[str, dict[str, float]]:
    groups: dict[str, dict[str, list[float]]] = {}
    for s in steps:
        for group, norms in s.gradient_norms.items():
            for name, norm in norms.items():
                groups.setdefault(group, {}).setdefault(name, []).append(norm)
    return {group: {name: sum(v) / len(v) for name, v in norms.items()} for group, norms in groups.items()}


def _mean_share(evaluation: Evaluation | None) -> float | None:
    return None if evaluation is None or evaluation.share is None else round(float(evaluation.share.mean()), 4)


def _per_photo(evaluation: Evaluation | None) -> list[float] | None:
    return None if evaluation is None or evaluation.share is None else [round(float(v), 4) for v in evaluation.share]


def training_report(*, identity: str, model_family: str, settings: TrainingSettings, trainer: IdentityTrainer,
                    first_step: int, resumed_from: str | None, before: Evaluation | None, after: Evaluation | None,
                    files: Sequence[Path], seconds: float) -> dict:
    """``after`` is None when the run was interrupted before its evaluation after training (and ``before``
    when it never evaluated): their entries are null."""
    report = {
        "identity": identity, "model_family": model_family, "settings": settings.to_dict(),
        "steps_done": trainer.step, "steps_this_run": trainer.step - first_step,
        "resumed_from": resumed_from,
        "final_losses": final_losses(trainer.history.steps),
        "loss_terms": loss_terms(trainer.history.steps, trainer.term_weights()),
        "validation_loss": validation_loss(trainer.history),
        "evaluation_diffusion_loss": {"before": None if before is None else before.diffusion_loss,
                                      "after": None if after is None else after.diffusion_loss},
        "face_attention_share": {"before": _mean_share(before), "after": _mean_share(after)},
        "files": [str(p) for p in files], "seconds": round(seconds, 1),
    }
    if trainer.scaler is not None:
        report["float16_loss_scaling"] = {"final_scale": trainer.scaler.get_scale(),
                                          "skipped_steps": trainer.skipped_total}
    if before is not None and before.share is None:
        report["face_attention_share"]["note"] = "no face masks (none given and no face detected)"
    elif before is not None or after is not None:
        report["face_attention_share"]["per_photo"] = {"before": _per_photo(before), "after": _per_photo(after)}
    return report
