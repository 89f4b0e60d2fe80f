"""Resuming a run: every setting that changes what a step does must be the first run's (the error names
it, both values and the fix); steps may grow, and the learning rate of every step is the one the first
run's schedule gives it, held at its last value after the first run's total; older states still load."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import fields

import pytest
import torch
from standin_trainer import analytic_trainer

from comfyui_idfuse.models.errors import TrainingError
from comfyui_idfuse.models.tokens.format import IDTokens
from comfyui_idfuse.models.training.settings import TrainingSettings
from comfyui_idfuse.nodes.glue.training_files import (
    RESUME_MAY_DIFFER,
    RESUME_MUST_MATCH,
    TRAINER_FORMAT,
    check_resumable,
)

SAVED = TrainingSettings(lora_rank=2, lr_schedule="cosine", warmup_steps=3, min_snr_gamma=5.0, attention_mode="both")


def _saved_run(settings: dict) -> IDTokens:
    vectors = {"clip_l": torch.zeros(5, 768)}
    return IDTokens(family="sd15", placeholder="sks", initializer="person", keys=vectors, values=vectors,
                    generator={"initializer.clip_l": torch.zeros(768)},
                    training={"format": TRAINER_FORMAT, "settings": settings}, source="me.safetensors")


def _other(value):
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return (2,)
    if value == ():
        return ("a photo of sks",)
    return (*value[1:], "other") if isinstance(value[0], str) else (*value[1:],) or (8,)


def test_every_setting_is_either_checked_or_allowed_to_differ():
    names = {f.name for f in fields(TrainingSettings)}
    assert set(RESUME_MUST_MATCH) | set(RESUME_MAY_DIFFER) == names
    assert not set(RESUME_MUST_MATCH) & set(RESUME_MAY_DIFFER)


@pytest.mark.parametrize("name", RESUME_MUST_MATCH)
def test_a_differing_setting_is_refused_naming_it_both_values_and_the_fix(name):
    saved = SAVED.to_dict()
    now = dataclasses.replace(SAVED, **{name: _other(getattr(SAVED, name))})
    shown = "loss_layers" if name == "loss_downscales" else name
    with pytest.raises(TrainingError) as error:
        check_resumable(_saved_run(saved), now, "sd15")
    message = str(error.value)
    assert f"resume_from me.safetensors was trained with {shown} = " in message
    assert f"Set {shown} to " in message and "resume_from to 'none'" in message
    if name == "loss_downscales":
        assert "loss_layers = '2, 4', this run has '4'" in message
    elif name not in ("templates", "lora_targets"):
        assert f"= {saved[name]!r}, this run has {now.to_dict()[name]!r}" in message


@pytest.mark.parametrize("name", RESUME_MAY_DIFFER)
def test_steps_and_what_changes_only_speed_or_rounding_may_differ(name):
    saved = SAVED.to_dict()
    value = {"training_dtype": "float16"}.get(name, _other(getattr(SAVED, name)))
    now = dataclasses.replace(SAVED, **{name: value})
    assert check_resumable(_saved_run(saved), now, "sd15")["settings"] == saved


def test_settings_an_older_file_lacks_are_what_that_version_did():
    saved = TrainingSettings().to_dict()
    del saved["generator_width"], saved["min_snr_gamma"], saved["reference_loss_scale"]  # e.g. a 0.1.0 file
    check_resumable(_saved_run(saved), TrainingSettings(reference_loss_scale=1.0), "sd15")
    with pytest.raises(TrainingError, match=re.escape("generator_width = 256, this run has 512")):
        check_resumable(_saved_run(saved), TrainingSettings(generator_width=512, reference_loss_scale=1.0), "sd15")
    # before reference_loss_scale existed, the reference term had a factor of 1: a mode without that term
    # resumes with today's default, one with it must keep 1
    check_resumable(_saved_run(saved), TrainingSettings(), "sd15")
    saved["attention_mode"] = "reference_prompt"
    with pytest.raises(TrainingError, match=re.escape("reference_loss_scale = 1.0, this run has")):
        check_resumable(_saved_run(saved), TrainingSettings(attention_mode="reference_prompt"), "sd15")
    check_resumable(_saved_run(saved), TrainingSettings(attention_mode="reference_prompt", reference_loss_scale=1.0),
                    "sd15")


# --- the learning-rate schedule of a resumed run ---------------------------------------------------


def _rates(trainer) -> list[float]:
    return [s.learning_rate for s in trainer.history.steps]


def _resumed(monkeypatch, from_trainer, steps: int, state=None, **settings):
    """A new trainer resuming ``from_trainer``'s run (its weights, as the token file keeps them, and its state)."""
    trainer = analytic_trainer(monkeypatch, steps=steps, **settings)
    trainer.generator.load_state_dict(from_trainer.generator.state_dict())
    trainer.load_state_tensors(*(state or from_trainer.state_tensors()))
    trainer.run()
    return trainer


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant_with_warmup"])
def test_a_resumed_run_keeps_the_first_runs_schedule_and_holds_its_last_rate(monkeypatch, schedule):
    pytest.importorskip("diffusers")
    common = {"lr_schedule": schedule, "warmup_steps": 2, "learning_rate": 0.1}
    full = analytic_trainer(monkeypatch, steps=6, **common)
    full.run()
    expected = _rates(full)
    assert len(set(expected)) > 2 or schedule == "constant_with_warmup"

    cut = analytic_trainer(monkeypatch, steps=6, **common)
    for _ in range(3):
        cut.train_step()
    longer = _resumed(monkeypatch, cut, steps=9, **common)  # interrupted at 3, now 9 steps
    assert _rates(longer) == pytest.approx(expected + [expected[-1]] * 3, rel=1e-12)
    assert [s.step for s in longer.history.steps] == list(range(1, 10))
    # resumed again with more steps: still the first run's schedule (its total is in the state)
    again = _resumed(monkeypatch, longer, steps=11, **common)
    assert _rates(again) == pytest.approx(expected + [expected[-1]] * 5, rel=1e-12)
    # and the parameters follow the uninterrupted run as far as it went
    same = _resumed(monkeypatch, cut, steps=6, **common)
    torch.testing.assert_close(same.generator.vectors, full.generator.vectors, rtol=0, atol=0)


def test_a_state_saved_by_0_2_0_resumes_with_its_schedule(monkeypatch):
    """0.2.0 wrote a 5-column history and no lr_schedule_steps: the saved settings' steps are the total."""
    pytest.importorskip("diffusers")
    common = {"lr_schedule": "linear", "warmup_steps": 1, "learning_rate": 0.1}
    full = analytic_trainer(monkeypatch, steps=4, **common)
    full.run()
    cut = analytic_trainer(monkeypatch, steps=4, **common)
    cut.gradient_share_every = 0
    for _ in range(2):
        cut.train_step()
    tensors, metadata = cut.state_tensors()
    old_metadata = {k: v for k, v in metadata.items() if k not in ("lr_schedule_steps", "history_columns")}
    old_tensors = {**tensors, "history": tensors["history"][:, :5].contiguous()}
    assert json.loads(old_metadata["settings"])["steps"] == 4
    resumed = _resumed(monkeypatch, cut, 6, (old_tensors, old_metadata), **common)
    assert _rates(resumed) == pytest.approx(_rates(full) + [_rates(full)[-1]] * 2, rel=1e-12)
    assert resumed.history.steps[0].terms == {}  # the old steps have no terms; the new ones do
    assert set(resumed.history.steps[-1].terms) == {"face_mask", "reference_prompt"}
