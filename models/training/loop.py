"""Pieces every training loop here uses, whatever it trains. Plain torch.

The diffusion loss in the model's own parameterisation and its Min-SNR weight, the learning-rate
schedule, the seeded random source of each step, float16 loss scaling, and the optimiser state a
run needs to be resumed exactly (as safetensors tensors and string metadata), whatever the optimiser.
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
from .optimizers import AdamW, kind_of
from .settings import LR_SCHEDULES, MAX_SKIPPED_STEPS

log = logging.getLogger("idfuse.training")

OPTIMIZER_PREFIX = "optimizer."
LOSS_SCALER_KEY = "loss_scaler"
# The optimiser's kind (optimizers.OPTIMIZER_KINDS); states without it are AdamW's, the only kind before.
OPTIMIZER_KIND_KEY = "optimizer"
UNRECORDED_KIND = AdamW.name
# The state's entries that are not tensors (Prodigy's and bitsandbytes' integer step), as JSON.
OPTIMIZER_VALUES_KEY = "optimizer_values"


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

def _flattened(entries: dict, prefix: str) -> list[tuple[str, object]]:
    """(dotted path, value) of every leaf of a parameter's state; bitsandbytes nests its quantisation state."""
    leaves = []
    for name, value in entries.items():
        assert "." not in str(name), f"optimiser state entry {name!r}: a dot would not survive the round trip"
        if isinstance(value, dict):
            leaves.extend(_flattened(value, f"{prefix}{name}."))
        else:
            leaves.append((f"{prefix}{name}", value))
    return leaves


def _nested(leaves: dict[str, object]) -> dict[int, dict]:
    """The inverse of ``_flattened`` over all parameters: index -> that parameter's state."""
    entries: dict[int, dict] = {}
    for key, value in leaves.items():
        index, *path = key.split(".")
        node = entries.setdefault(int(index), {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return entries


def _kind_name(optimizer: torch.optim.Optimizer) -> str:
    kind = kind_of(optimizer)
    return type(optimizer).__name__ if kind is None else kind.name


def optimizer_state(optimizer: torch.optim.Optimizer, step: int, scaler: LossScaler | None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Optimiser state tensors (moments, Prodigy's s and p0, 8-bit's quantised moments and their scales),
    and the step, parameter groups (Prodigy's d, d0, ... are there), the state's other values (Prodigy's
    and 8-bit's integer step), the optimiser's kind and the loss scale (metadata)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, object] = {}
    for index, entries in state["state"].items():
        for key, value in _flattened(entries, f"{index}."):
            if torch.is_tensor(value):
                tensors[f"{OPTIMIZER_PREFIX}{key}"] = value.detach().cpu().clone().contiguous()
            else:
                values[key] = value
    metadata = {"step": str(step), "param_groups": json.dumps(state["param_groups"])}
    kind = _kind_name(optimizer)
    if kind != UNRECORDED_KIND:  # AdamW states stay as they were before other kinds existed
        metadata[OPTIMIZER_KIND_KEY] = kind
    if values:
        metadata[OPTIMIZER_VALUES_KEY] = json.dumps(values)
    if scaler is not None:
        metadata[LOSS_SCALER_KEY] = scaler.to_metadata()
    return tensors, metadata


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         metadata: dict[str, str], scaler: LossScaler | None, mismatch_hint: str) -> int:
    """Restore what ``optimizer_state`` saved; returns the step. ``mismatch_hint`` says what differs
    when the saved moments belong to another set of parameters."""
    saved_kind, kind = metadata.get(OPTIMIZER_KIND_KEY, UNRECORDED_KIND), _kind_name(optimizer)
    if saved_kind != kind:
        raise TrainingError(f"The training state holds the state of the {saved_kind} optimizer, this run uses {kind}: "
                            f"set optimizer to {saved_kind} (IDFuse Training Options) as in the run being resumed, "
                            f"or start a new run.")
    groups = json.loads(metadata["param_groups"])
    saved = sum(len(g["params"]) for g in groups)
    parameters = [p for g in optimizer.param_groups for p in g["params"]]
    if saved != len(parameters):
        raise TrainingError(f"The training state holds optimiser moments for {saved} parameters, this trainer has "
                            f"{len(parameters)}: {mismatch_hint}")
    device = parameters[0].device
    leaves: dict[str, object] = {key[len(OPTIMIZER_PREFIX):]: value for key, value in tensors.items()
                                 if key.startswith(OPTIMIZER_PREFIX)}
    leaves.update(json.loads(metadata.get(OPTIMIZER_VALUES_KEY, "{}")))
    state = _nested(leaves)
    for entries in state.values():
        _to_device(entries, device)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scaler is not None and LOSS_SCALER_KEY in metadata:
        scaler.load_metadata(metadata[LOSS_SCALER_KEY])
    return int(metadata["step"])


def _to_device(entries: dict, device: torch.device, top: bool = True) -> None:
    """Every state tensor to the parameters' device but the step counter, which torch keeps on the CPU."""
    for name, value in entries.items():
        if isinstance(value, dict):
            _to_device(value, device, top=False)
        elif torch.is_tensor(value) and not (top and name == "step"):
            entries[name] = value.to(device)
