"""The training-loop pieces on their own: optimiser state resumes exactly, float16 loss scaling skips and
stops as it should and its state survives a resume, the random source of a step depends only on the step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyui_idfuse.models.errors import NonFiniteLossError, TrainingError
from comfyui_idfuse.models.training import loop
from comfyui_idfuse.models.training.loop import (
    LossScaler,
    backward,
    load_optimizer_state,
    optimizer_state,
    optimizer_step,
    step_generator,
)


def _model_and_optimizer(seed: int = 0) -> tuple[nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range,
           scaler: LossScaler | None = None, overflow: set[int] = frozenset()) -> None:
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        rng = step_generator(7, step)
        loss = model(torch.randn(4, 3, generator=rng)).square().mean()
        backward(loss * float("inf") if step in overflow else loss, scaler)
        optimizer_step(optimizer, list(model.parameters()), step + 1, {"loss": float(loss.detach())}, scaler)


def test_optimizer_state_resumes_exactly():
    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, range(6))

    cut, cut_optimizer = _model_and_optimizer()
    _train(cut, cut_optimizer, range(3))
    tensors, metadata = optimizer_state(cut_optimizer, 3, None)
    assert set(metadata) == {"step", "param_groups"} and all(k.startswith("optimizer.") for k in tensors)
    resumed, resumed_optimizer = _model_and_optimizer(seed=1)
    resumed.load_state_dict(cut.state_dict())
    assert load_optimizer_state(resumed_optimizer, tensors, metadata, None, "hint") == 3
    _train(resumed, resumed_optimizer, range(3, 6))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_optimizer_state_of_other_parameters_is_refused_with_the_hint():
    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, range(1))
    tensors, metadata = optimizer_state(optimizer, 1, None)
    other = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(TrainingError, match=r"moments for 2 parameters, this trainer has 1: use the same settings"):
        load_optimizer_state(other, tensors, metadata, None, "use the same settings")


def test_without_loss_scaling_an_overflowing_gradient_is_an_error():
    model, optimizer = _model_and_optimizer()
    with pytest.raises(NonFiniteLossError, match=r"Training step 2: the gradient is not finite \(loss "):
        _train(model, optimizer, range(3), overflow={1})


def test_loss_scaling_skips_overflowing_steps_and_its_state_resumes():
    model, optimizer = _model_and_optimizer()
    scaler = LossScaler("cpu")
    _train(model, optimizer, range(1), scaler)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, optimizer, range(1, 2), scaler, overflow={1})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # skipped
    assert scaler.get_scale() == 2.0 ** 15 and scaler.skipped_in_a_row == 1 and scaler.skipped_total == 1
    _train(model, optimizer, range(2, 3), scaler)
    assert scaler.skipped_in_a_row == 0 and scaler.skipped_total == 1

    tensors, metadata = optimizer_state(optimizer, 3, scaler)
    restored = LossScaler("cpu")
    fresh, fresh_optimizer = _model_and_optimizer()
    load_optimizer_state(fresh_optimizer, tensors, metadata, restored, "hint")
    assert restored.to_metadata() == scaler.to_metadata()
    assert restored.get_scale() == 2.0 ** 15 and restored.skipped_total == 1


def test_loss_scaling_stops_after_too_many_skips_in_a_row(monkeypatch):
    monkeypatch.setattr(loop, "MAX_SKIPPED_STEPS", 2)
    model, optimizer = _model_and_optimizer()
    scaler = LossScaler("cpu")
    _train(model, optimizer, range(2), scaler, overflow={0})  # one skip, then a good step: goes on
    with pytest.raises(NonFiniteLossError, match=r"step 4: the gradient in 2 float16 steps in a row"):
        _train(model, optimizer, range(2, 5), scaler, overflow={2, 3, 4})


def test_step_generator_depends_only_on_seed_step_and_micro_batch():
    def draw(*args):
        return torch.rand(3, generator=step_generator(*args))

    torch.testing.assert_close(draw(1, 5, 0), draw(1, 5, 0))
    assert not torch.equal(draw(1, 5, 0), draw(1, 6, 0))
    assert not torch.equal(draw(1, 5, 0), draw(1, 5, 1))
    assert not torch.equal(draw(1, 5, 0), draw(2, 5, 0))
