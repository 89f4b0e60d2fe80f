"""The report of a training run (also saved as <save_name>.report.json): settings, steps, final
losses, the face share of the placeholder's attention before and after, float16 loss scaling."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .settings import TrainingSettings
from .token_trainer import Evaluation, IdentityTrainer, StepLosses

FINAL_LOSS_STEPS = 10


def final_losses(steps: Sequence[StepLosses], last: int = FINAL_LOSS_STEPS) -> dict[str, float] | None:
    """Mean losses of the last steps (single steps are noisy: each has its own random timestep)."""
    recent = steps[-last:]
    if not recent:
        return None
    return {"diffusion": sum(s.diffusion for s in recent) / len(recent),
            "attention": sum(s.attention for s in recent) / len(recent), "over_steps": len(recent)}


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
