"""The validation loss: a held-out photo's diffusion loss at fixed timesteps and noise (record_validation),
kept with the training state, drawn on the loss curve and written in the report."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from factories import make_clip, make_model, tiny_vae
from torch import nn
from trainer_inputs import face_photos, train_node

from comfyui_idfuse.models.errors import TrainingError
from comfyui_idfuse.models.training.plots import DIFFUSION_COLOUR, VALIDATION_COLOUR, render_loss_curve
from comfyui_idfuse.models.training.probes import AttentionProbes, ProbeBatch
from comfyui_idfuse.models.training.report import training_report
from comfyui_idfuse.models.training.settings import TrainingSettings
from comfyui_idfuse.models.training.token_trainer import (
    VALIDATION_TIMESTEPS,
    Host,
    IdentityTrainer,
    LossHistory,
    PromptTable,
    StepLosses,
    TrainingData,
)


class _Generator(nn.Module):
    """One K and one V vector per stage, stand-in for the token generator."""

    def __init__(self, stages: int):
        super().__init__()
        self.vectors = nn.Parameter(torch.linspace(0.5, 1.5, stages * 4).view(stages, 4))

    def forward(self):
        return {"clip_l": self.vectors}, {"clip_l": self.vectors * 2}


class _Calls:
    """What the stand-in model saw on each call."""

    def __init__(self):
        self.sigmas, self.inputs, self.templates, self.grad_enabled, self.probe_batches = [], [], [], [], []


def _trainer(calls: _Calls | None = None, probes: AttentionProbes | None = None, **changes) -> IdentityTrainer:
    """A trainer on a stand-in model whose x0 prediction is the noisy latent times the mean of its row's
    keys context (so training the vectors changes the loss); three training photos, flipped."""
    sampling = make_model("sd15").get_model_object("model_sampling")
    probes = probes or AttentionProbes({}, attention=None)

    def denoise(x, sigma, keys, values, templates):
        if calls is not None:
            calls.sigmas.append(sigma.clone())
            calls.inputs.append(x.clone())
            calls.templates.extend(templates)
            calls.grad_enabled.append(torch.is_grad_enabled())
            calls.probe_batches.append(probes.batch)
        return x * keys.mean((1, 2)).view(-1, 1, 1, 1)  # row by row, as a real model

    host = Host(encode=lambda template, vectors: vectors["clip_l"].view(1, 1, -1), denoise=denoise,
                model_sampling=sampling, device=torch.device("cpu"))
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    data = TrainingData(latents, None, torch.arange(3))
    prompts = PromptTable(torch.tensor([1, 1]))
    settings = TrainingSettings(**{"num_stages": 2, "steps": 3, "attention_mode": "off", "lora_rank": 0,
                                   "learning_rate": 0.05, "batch_size": 2, **changes})
    return IdentityTrainer(settings, host, data, prompts, probes, _Generator(settings.num_stages))


def _held_out(count: int = 1) -> torch.Tensor:
    return torch.randn(count, 4, 8, 8, generator=torch.Generator().manual_seed(7))


def test_fixed_timesteps_noise_and_template_without_gradients_or_probes():
    calls = _Calls()
    trainer = _trainer(calls)
    trainer.probes.begin(ProbeBatch(torch.tensor([1])))  # left set by mistake: still nothing recorded
    first = trainer.record_validation(_held_out())
    seen = len(calls.sigmas)
    second = trainer.record_validation(_held_out())
    assert first == second
    # one row per timestep for one photo, in chunks of 4; the second measurement repeats the first exactly
    assert seen == VALIDATION_TIMESTEPS // 4 and len(calls.sigmas) == 2 * seen
    for a, b in zip(calls.sigmas[:seen], calls.sigmas[seen:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(calls.inputs[:seen], calls.inputs[seen:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sampling = trainer.host.model_sampling
    timesteps = sampling.timestep(torch.cat(calls.sigmas[:seen])).round().long()
    expected = ((torch.arange(VALIDATION_TIMESTEPS) + 0.5) * 1000 / VALIDATION_TIMESTEPS).long()
    assert timesteps.tolist() == expected.tolist()  # spread over the whole schedule
    assert set(calls.templates) == {0}
    assert not any(calls.grad_enabled)
    assert all(batch is None for batch in calls.probe_batches)  # no attention recorded, fast attention kept


def test_the_value_does_not_depend_on_the_chunk_size_and_averages_the_photos():
    trainer = _trainer()
    held_out = _held_out(3)
    values = [trainer.record_validation(held_out, chunk=chunk) for chunk in (1, 4, 5, 64)]
    assert values == pytest.approx([values[0]] * 4, rel=1e-6)
    assert len(trainer.history.validation) == 1  # one value per step: each measurement replaced the last


def test_validation_touches_no_random_state_parameter_or_gradient():
    plain, validated = _trainer(), _trainer()
    plain.train_step()
    validated.train_step()
    gradients = [p.grad.clone() for p in validated.parameters()]
    parameters = [p.detach().clone() for p in validated.parameters()]
    moments = {k: v.clone() for k, v in validated.optimizer.state_dict()["state"][0].items()}
    rng_state = torch.get_rng_state()
    validated.record_validation(_held_out())
    assert torch.equal(torch.get_rng_state(), rng_state)
    for p, before, grad in zip(validated.parameters(), parameters, gradients, strict=True):
        assert torch.equal(p, before) and torch.equal(p.grad, grad)
    for name, value in validated.optimizer.state_dict()["state"][0].items():
        assert torch.equal(value, moments[name])
    # training goes on exactly as without the measurement
    assert plain.train_step() == validated.train_step()
    for a, b in zip(plain.parameters(), validated.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_noise_comes_from_the_seed_not_the_step():
    trainer = _trainer()
    held_out = _held_out()
    at_start = trainer.record_validation(held_out)
    trainer.step = 7  # a later step with the same parameters: the same noise and timesteps
    assert trainer.record_validation(held_out) == at_start
    assert _trainer(seed=1).record_validation(held_out) != at_start
    trainer.train_step()
    assert trainer.record_validation(held_out) != at_start  # training changed the vectors
    assert [step for step, _ in trainer.history.validation] == [0, 7, 8]


def test_min_snr_weighting_applies_as_in_training():
    held_out = _held_out()
    assert _trainer(min_snr_gamma=5.0).record_validation(held_out) != _trainer().record_validation(held_out)


def test_latents_that_are_not_a_batch_of_the_training_channels_are_refused():
    trainer = _trainer()
    for bad in (torch.zeros(4, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(0, 4, 8, 8)):
        with pytest.raises(TrainingError, match="Validation latents of shape"):
            trainer.record_validation(bad)
    assert trainer.history.validation == []
    trainer.record_validation(torch.zeros(1, 4, 12, 8))  # another aspect is fine: the UNet takes any size


def test_the_validation_history_is_saved_and_restored_with_the_state(tmp_path):
    trainer = _trainer()
    held_out = _held_out()
    trainer.record_validation(held_out)
    trainer.train_step()
    trainer.train_step()
    trainer.record_validation(held_out)
    tensors, metadata = trainer.state_tensors()
    path = tmp_path / "run.trainstate"
    safetensors.torch.save_file(tensors, str(path), metadata)
    resumed = _trainer()
    resumed.generator.load_state_dict(trainer.generator.state_dict())  # saved in the token file
    resumed.load_state_tensors(safetensors.torch.load_file(str(path)), metadata)
    assert resumed.history.validation == trainer.history.validation
    assert [step for step, _ in resumed.history.validation] == [0, 2]
    # measured again at the step it resumes from: the same state gives the same value, still one entry
    assert resumed.record_validation(held_out) == trainer.history.validation[-1][1]
    assert resumed.history.validation == trainer.history.validation

    old = {k: v for k, v in tensors.items() if k != "validation_history"}  # a state from before validation
    earlier = _trainer()
    earlier.load_state_tensors(old, metadata)
    assert earlier.step == 2 and earlier.history.validation == [] and len(earlier.history.steps) == 2
    without = _trainer()
    without.train_step()
    assert "validation_history" not in without.state_tensors()[0]

    damaged = dict(tensors, validation_history=torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(TrainingError, match="validation history has shape"):
        _trainer().load_state_tensors(damaged, metadata)


def _history(validation: list[tuple[int, float]]) -> LossHistory:
    steps = [StepLosses(step, 1.0 / step, 0.1, 1.0 / step + 0.1, 1e-4) for step in range(1, 21)]
    return LossHistory(steps, validation)


def _pixels_of(image: torch.Tensor, colour: tuple[int, int, int]) -> torch.Tensor:
    """(y, x) of the pixels of exactly this colour."""
    rgb = (image[0] * 255).round().long()
    return torch.nonzero((rgb == torch.tensor(colour)).all(-1))


@pytest.mark.parametrize("size", [(768, 384), (384, 192)])  # the node's output and the progress preview
def test_the_loss_curve_draws_the_validation_loss_in_the_diffusion_panel(size):
    width, height = size
    assert len(_pixels_of(render_loss_curve(_history([]), size), VALIDATION_COLOUR)) == 0
    image = render_loss_curve(_history([(0, 1.2), (10, 0.5), (20, 0.3)]), size)
    points = _pixels_of(image, VALIDATION_COLOUR)
    panel_h = height // 2
    assert len(points) > 0 and int(points[:, 0].max()) < panel_h  # the diffusion panel, not the attention panel
    assert len(_pixels_of(image, DIFFUSION_COLOUR)) > 0
    # the step-0 measurement (before training) at the left edge, the last one at the right edge; on the training
    # loss's scale (0.05 at step 20 to 1.2, the highest value of both): 0.3 is a fifth of the way up the plot
    plot_top, plot_h = 8 + 14, panel_h - 2 * 8 - 14
    left, right = points[points[:, 1] <= 12], points[points[:, 1] >= width - 12]
    assert len(left) > 0 and len(right) > 0
    assert float(right[:, 0].float().mean()) == pytest.approx(plot_top + plot_h * (1 - 0.25 / 1.15), abs=2)
    # the label with the last value, in the validation colour (antialiased: orange blended with white)
    rgb = (image[0, :plot_top - 3] * 255).round()
    orange = (rgb[..., 0] > 200) & (rgb[..., 0] - rgb[..., 1] > 40) & (rgb[..., 1] - rgb[..., 2] > 40)
    assert int(orange.sum()) > 20


def test_the_loss_curve_skips_a_validation_loss_that_is_not_finite():
    image = render_loss_curve(_history([(0, float("nan")), (10, float("inf"))]))
    assert len(_pixels_of(image, VALIDATION_COLOUR)) == 0


def _report(trainer: IdentityTrainer) -> dict:
    return training_report(identity="x.safetensors", model_family="sd15", settings=trainer.settings, trainer=trainer,
                           first_step=0, resumed_from=None, before=None, after=None, files=[], seconds=1.0)


def test_the_report_lists_the_validation_loss_per_measured_step():
    trainer = _trainer()
    trainer.train_step()
    assert _report(trainer)["validation_loss"] is None
    first = trainer.record_validation(_held_out())
    trainer.train_step()
    second = trainer.record_validation(_held_out())
    report = _report(trainer)
    assert report["validation_loss"] == {"steps": [1, 2], "values": [first, second]}
    assert report["final_losses"]["over_steps"] == 2  # the training losses are reported as before
    trainer.history.validation.append((3, float("nan")))
    assert json.loads(json.dumps(_report(trainer)))["validation_loss"]["values"][-1] is None


def test_validation_through_the_real_patched_model_is_repeatable(tokenizer_dir, monkeypatch, tmp_path):
    """On the tiny SD1.5 UNet with the trainer's patches and probes, as the training run sets it up."""
    measured = []
    run = IdentityTrainer.run

    def run_with_validation(self, on_step=lambda _losses: None):
        held_out = self.data.latents[:1]
        measured.append((self.record_validation(held_out), self.record_validation(held_out)))
        run(self, on_step)
        measured.append((self.record_validation(held_out), self.record_validation(held_out)))

    monkeypatch.setattr(IdentityTrainer, "run", run_with_validation)
    images, masks = face_photos()
    train_node(make_model("sd15"), make_clip("sd15", tokenizer_dir), tiny_vae(), images, masks,
               "validation_real_model")
    (before, before_again), (after, after_again) = measured
    assert before == before_again and after == after_again
    assert before != after and all(torch.isfinite(torch.tensor(v)) for v in (before, after))
