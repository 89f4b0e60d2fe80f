"""Pieces every training loop here uses, whatever it trains. Plain torch.

The diffusion loss in the model's own parameterisation and its Min-SNR weight, the learning-rate
schedule, the seeded random source of each step, float16 loss scaling, and the optimiser state a
run needs to be resumed exactly (as safetensors tensors and string metadata).
"""

from __future__ import annotations

import json
import logging
import types
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from ..errors import NonFiniteLossError, TrainingError
from .settings import LR_SCHEDULES, MAX_SKIPPED_STEPS

log = logging.getLogger("idfuse.training")

OPTIMIZER_PREFIX = "optimizer."
LOSS_SCALER_KEY = "loss_scaler"


# --- losses --------------------------------------------------------------------------------------

def diffusion_loss(model_sampling, sigma: torch.Tensor, x0_pred: torch.Tensor, x0: torch.Tensor,
                   snr_weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE in the model's own parameterisation (eps, v, ...), from its predicted x0.

    ComfyUI's denoised x0 is ``offset(x) + gain(sigma) * raw_output``; the raw target is the output
    that gives the true x0, so raw error = (x0_pred - x0) / gain, whatever the parameterisation.
    ``snr_weight`` (Min-SNR) weights the x0 error directly: that is min(snr, γ)/snr for eps and
    min(snr, γ)/(snr + 1) for v, expressed once.
    """
    gain = model_sampling.calculate_denoised(sigma, torch.ones_like(x0_pred), torch.zeros_like(x0_pred))
    error = (x0_pred.float() - x0.float()) ** 2
    if snr_weight is None:
        return (error / gain.float() ** 2).mean()
    return (error * snr_weight.view(-1, 1, 1, 1)).mean()


def min_snr_weight(model_sampling, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, γ) per sample, the SNR from diffusers' compute_snr on the model's own noise schedule."""
    try:
        from diffusers.training_utils import compute_snr
    except ImportError as e:
        raise TrainingError("min_snr_gamma > 0 needs the diffusers package (pip install diffusers); "
                            "or set min_snr_gamma to 0.") from e
    sigmas = model_sampling.sigmas.detach().float().cpu()
    schedule = types.SimpleNamespace(alphas_cumprod=1.0 / (1.0 + sigmas ** 2))
    snr = compute_snr(schedule, timesteps.cpu())
    return snr.clamp(max=gamma)


# --- schedule, randomness, precision -----------------------------------------------------------

def make_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """diffusers' scheduler of that name, or None for a constant rate without warm-up."""
    if name == "constant" and warmup_steps == 0:
        return None
    if name not in LR_SCHEDULES:
        raise TrainingError(f"Unknown lr_schedule '{name}'; use one of {', '.join(LR_SCHEDULES)}.")
    try:
        from diffusers.optimization import get_scheduler
    except ImportError as e:
        raise TrainingError(f"lr_schedule '{name}' needs the diffusers package (pip install diffusers); "
                            f"or use lr_schedule constant with warmup_steps 0.") from e
    if name == "constant":
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def advance_lr_scheduler(scheduler, steps: int) -> None:
    """Bring a fresh scheduler to where a resumed run stopped."""
    if scheduler is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": on purpose
        for _ in range(steps):
            scheduler.step()


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """The random source of one micro-batch: depends only on (seed, step, micro), so a run resumed at
    step k draws what an uninterrupted run would have drawn from there."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2 ** 63))


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast to ``dtype``, or nothing when the model computes in its own dtype."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --- gradients and the optimiser step ------------------------------------------------------------

def gradients_finite(parameters: Sequence[nn.Parameter]) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in parameters)


class LossScaler:
    """float16 loss scaling (torch.amp.GradScaler): a step whose gradients overflow is skipped and the
    scale halved, as mixed-precision training does; MAX_SKIPPED_STEPS skips in a row stop training."""

    def __init__(self, device_type: str):
        self.grad_scaler = torch.amp.GradScaler(device_type)
        self.skipped_in_a_row = 0
        self.skipped_total = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.grad_scaler.scale(loss)

    def get_scale(self) -> float:
        return self.grad_scaler.get_scale()

    def step(self, optimizer: torch.optim.Optimizer, parameters: Sequence[nn.Parameter], step: int,
             losses: dict[str, float]) -> bool:
        """Unscale the gradients and step unless they overflowed; True if the step was taken."""
        self.grad_scaler.unscale_(optimizer)
        finite = gradients_finite(parameters)
        self.grad_scaler.step(optimizer)  # skips the update when the gradients are not finite
        self.grad_scaler.update()
        self.skipped_in_a_row = 0 if finite else self.skipped_in_a_row + 1
        self.skipped_total += 0 if finite else 1
        if not finite:
            log.debug("step %d skipped, float16 gradients overflowed; loss scale now %g", step, self.get_scale())
        if self.skipped_in_a_row >= MAX_SKIPPED_STEPS:
            raise NonFiniteLossError(step, f"gradient in {MAX_SKIPPED_STEPS} float16 steps in a row", losses)
        return finite

    def to_metadata(self) -> str:
        return json.dumps({**self.grad_scaler.state_dict(), "skipped_steps": self.skipped_in_a_row,
                           "skipped_total": self.skipped_total})

    def load_metadata(self, text: str) -> None:
        state = json.loads(text)
        self.skipped_in_a_row = state.pop("skipped_steps", 0)
        self.skipped_total = state.pop("skipped_total", 0)
        self.grad_scaler.load_state_dict(state)


def backward(loss: torch.Tensor, scaler: LossScaler | None) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, parameters: Sequence[nn.Parameter], step: int,
                   losses: dict[str, float], scaler: LossScaler | None) -> None:
    """The optimiser step. ``losses`` (name -> value) go into the error when the gradients are not
    finite: without loss scaling that stops training at once; with it the step is skipped."""
    if scaler is not None:
        scaler.step(optimizer, parameters, step, losses)
        return
    if not gradients_finite(parameters):
        raise NonFiniteLossError(step, "gradient", losses)
    optimizer.step()


# --- state for resuming --------------------------------------------------------------------------

def optimizer_state(optimizer: torch.optim.Optimizer, step: int, scaler: LossScaler | None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Optimiser moments (tensors), and the step, parameter groups and loss scale (metadata)."""
    state = optimizer.state_dict()
    tensors = {f"{OPTIMIZER_PREFIX}{index}.{name}": torch.as_tensor(value).detach().cpu().clone()
               for index, entries in state["state"].items() for name, value in entries.items()}
    metadata = {"step": str(step), "param_groups": json.dumps(state["param_groups"])}
    if scaler is not None:
        metadata[LOSS_SCALER_KEY] = scaler.to_metadata()
    return tensors, metadata


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         metadata: dict[str, str], scaler: LossScaler | None, mismatch_hint: str) -> int:
    """Restore what ``optimizer_state`` saved; returns the step. ``mismatch_hint`` says what differs
    when the saved moments belong to another set of parameters."""
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIMIZER_PREFIX):
            _, index, name = key.split(".", 2)
            entries.setdefault(int(index), {})[name] = value
    groups = json.loads(metadata["param_groups"])
    saved = sum(len(g["params"]) for g in groups)
    parameters = [p for g in optimizer.param_groups for p in g["params"]]
    if saved != len(parameters):
        raise TrainingError(f"The training state holds optimiser moments for {saved} parameters, this trainer has "
                            f"{len(parameters)}: {mismatch_hint}")
    device = parameters[0].device
    state = {i: {k: (v if k == "step" else v.to(device)) for k, v in e.items()} for i, e in entries.items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scaler is not None and LOSS_SCALER_KEY in metadata:
        scaler.load_metadata(metadata[LOSS_SCALER_KEY])
    return int(metadata["step"])
