"""Each loss term's value and share of the trained parameters' gradient: measured on the steps it should
be, equal to the gradient each weighted term gives, without changing the training; kept in the loss
history (a 0.2.0 history of five columns still loads), the report and the loss plot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from standin_trainer import LAMBDA, REFERENCE_SCALE, analytic_trainer

from comfyui_idfuse.models.training import token_trainer
from comfyui_idfuse.models.training.losses import CombinedLoss, attention_loss_for, face_mask_loss, reference_loss
from comfyui_idfuse.models.training.plots import SHARE_COLOURS, render_loss_curve
from comfyui_idfuse.models.training.probes import LayerRecord
from comfyui_idfuse.models.training.report import loss_terms
from comfyui_idfuse.models.training.settings import TrainingSettings
from comfyui_idfuse.models.training.token_trainer import LossHistory, StepLosses, gradient_shares
from comfyui_idfuse.models.unet import BlockKey


def test_gradient_norms_are_those_of_each_weighted_term(monkeypatch):
    trainer = analytic_trainer(monkeypatch, adapters=True, accumulation=2)
    trainer.gradient_share_every = 1
    v = trainer.generator.vectors.detach().clone()
    w = trainer.adapters["layer"].weight.detach().clone()
    losses = trainer.train_step()
    # the same micro-batch twice: its gradient, averaged over the two
    expected = {"tokens": {"diffusion": float((2 * v).norm()), "face_mask": LAMBDA * 2.0,
                           "reference_prompt": LAMBDA * REFERENCE_SCALE * 3 * 2.0},
                "lora": {"diffusion": float((2 * w).norm()), "face_mask": LAMBDA * 2 * math.sqrt(2),
                         "reference_prompt": 0.0}}
    assert list(losses.gradient_norms) == ["tokens", "lora"]
    for group, norms in expected.items():
        assert losses.gradient_norms[group] == pytest.approx(norms), group
    assert losses.terms == pytest.approx({"face_mask": float(v.sum() + 2 * w.sum()), "reference_prompt": 3 * float(v.sum())})
    assert losses.attention == pytest.approx(sum(losses.terms.values()))
    # the step's own gradient is the sum of the terms' gradients
    total_grad = 2 * v + LAMBDA * (1 + REFERENCE_SCALE * 3)
    assert losses.total == pytest.approx(float((v ** 2).sum() + (w ** 2).sum())
                                         + LAMBDA * (losses.terms["face_mask"] + REFERENCE_SCALE * losses.terms["reference_prompt"]))
    torch.testing.assert_close(trainer.generator.vectors.grad, total_grad)


def test_gradients_are_measured_at_the_first_and_every_nth_step_without_changing_training(monkeypatch):
    measured = analytic_trainer(monkeypatch, steps=7)
    measured.gradient_share_every = 3
    plain = analytic_trainer(monkeypatch, steps=7)
    plain.gradient_share_every = 0
    measured.run()
    plain.run()
    assert [s.step for s in measured.history.steps if s.gradient_norms] == [1, 3, 6]
    assert all(s.gradient_norms is None for s in plain.history.steps)
    assert torch.equal(measured.generator.vectors, plain.generator.vectors)
    assert [s.terms for s in measured.history.steps] == [s.terms for s in plain.history.steps]


def test_the_mode_gives_its_terms_by_name():
    gen = torch.Generator().manual_seed(0)
    records = [LayerRecord(BlockKey("input", 7, 0, 2), (4, 4), torch.rand(2, 16, generator=gen).softmax(-1),
                           torch.rand(2, 16, generator=gen).softmax(-1))]
    masks = torch.zeros(2, 16, 16)
    masks[:, 4:12, 4:12] = 1
    both = attention_loss_for("both").terms(records, masks)
    assert list(both) == ["face_mask", "reference_prompt"]
    torch.testing.assert_close(both["face_mask"], face_mask_loss(records, masks))
    torch.testing.assert_close(both["reference_prompt"], reference_loss(records))
    assert list(attention_loss_for("face_mask").terms(records, masks)) == ["face_mask"]
    assert attention_loss_for("off").terms(records, masks) == {}
    twice = CombinedLoss("face_twice", (attention_loss_for("face_mask"),) * 2).terms(records, masks)
    assert list(twice) == ["face_mask"]
    torch.testing.assert_close(twice["face_mask"], 2 * face_mask_loss(records, masks))
    scales = attention_loss_for("both").term_scales(TrainingSettings(reference_loss_scale=7.0))
    assert scales == {"face_mask": 1.0, "reference_prompt": 7.0}


def _history() -> LossHistory:
    return LossHistory([
        StepLosses(1, 0.5, 0.2, 0.6, 1e-4, {"face_mask": 0.15, "reference_prompt": 0.05},
                   {"tokens": {"diffusion": 3.0, "face_mask": 1.0, "reference_prompt": 0.0},
                    "lora": {"diffusion": 1.0, "face_mask": 1.0, "reference_prompt": 2.0}}),
        StepLosses(2, 0.4, 0.1, 0.45, 1e-4, {"face_mask": 0.08, "reference_prompt": 0.02}, None),
        StepLosses(3, 0.3, 0.1, 0.35, 1e-4, {"face_mask": 0.07, "reference_prompt": 0.03},
                   {"tokens": {"diffusion": 1.0, "face_mask": 1.0, "reference_prompt": 2.0},
                    "lora": {"diffusion": 1.0, "face_mask": 1.0, "reference_prompt": 2.0}}),
    ])


def test_history_keeps_terms_and_gradient_norms_and_reads_five_column_histories():
    history = _history()
    columns = history.columns
    tensor = history.to_tensor(columns)
    assert tensor.shape == (3, 5 + len(columns))
    assert LossHistory.from_tensor(tensor, columns) == history
    # saved by 0.2.0: five columns, no names
    old = torch.tensor([[1, 0.5, 0.2, 0.6, 1e-4], [2, 0.4, 0.1, 0.45, 1e-4]], dtype=torch.float64)
    assert LossHistory.from_tensor(old) == LossHistory([StepLosses(1, 0.5, 0.2, 0.6, 1e-4),
                                                        StepLosses(2, 0.4, 0.1, 0.45, 1e-4)])
    assert LossHistory.from_tensor(torch.zeros(0, 5)).steps == []


def test_report_gives_each_terms_value_and_share():
    report = loss_terms(_history().steps, {"face_mask": 0.003, "reference_prompt": 3.0}, last=2)
    assert report["weights"] == {"diffusion": 1.0, "face_mask": 0.003, "reference_prompt": 3.0}
    assert report["values"] == pytest.approx({"diffusion": 0.35, "face_mask": 0.075, "reference_prompt": 0.025,
                                              "over_steps": 2})
    assert report["gradient_measured_steps"] == [1, 3]
    assert report["gradient_share"]["first"]["tokens"] == pytest.approx(
        {"diffusion": 0.75, "face_mask": 0.25, "reference_prompt": 0.0})
    assert report["gradient_share"]["last"]["lora"] == pytest.approx(
        {"diffusion": 0.25, "face_mask": 0.25, "reference_prompt": 0.5})  # mean norms of steps 1 and 3
    assert report["gradient_share"]["over_measurements"] == 2
    assert gradient_shares({"diffusion": 0.0, "face_mask": 0.0}) == {"diffusion": 0.0, "face_mask": 0.0}
    assert loss_terms([], {}) is None


def _colour_rows(image, colour) -> torch.Tensor:
    """Row indices of the image where a pixel has exactly ``colour``."""
    pixels = torch.from_numpy(np.array(image)).int()
    hit = (pixels == torch.tensor(colour)).all(-1)
    return torch.nonzero(hit.any(1)).flatten()


def test_loss_plot_shows_the_attention_terms_gradient_share():
    history = _history()
    image = render_loss_curve(history, size=(300, 300), as_pil=True)
    face, reference = _colour_rows(image, SHARE_COLOURS[0]), _colour_rows(image, SHARE_COLOURS[1])
    assert len(reference) and int(reference.min()) >= 200  # the third panel: reference_prompt's share line
    assert len(face) and int(face.max()) >= 200  # face_mask's share line (its colour is also the attention loss's)
    unmeasured = LossHistory([StepLosses(s.step, s.diffusion, s.attention, s.total, s.learning_rate)
                              for s in history.steps])
    assert not len(_colour_rows(render_loss_curve(unmeasured, size=(300, 300), as_pil=True), SHARE_COLOURS[1]))
    assert render_loss_curve(history).shape == (1, 384, 768, 3)


def test_the_trainer_measures_at_the_settings_interval(monkeypatch):
    monkeypatch.setattr(token_trainer, "GRADIENT_SHARE_EVERY", 2)
    trainer = analytic_trainer(monkeypatch, steps=4)
    assert trainer.gradient_share_every == 2
    trainer.run()
    assert [s.step for s in trainer.history.steps if s.gradient_norms] == [1, 2, 4]
