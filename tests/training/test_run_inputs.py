"""The training run's photo inputs: images or training_photos (IDFuse Load Training Photos: face crops and
caption templates, wired into the prompt table and the trainer), and the validation loss's held-out photos
(validation_images, else the last photo, left out of training) measured at step 0 and on the sample cadence."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from factories import make_clip, make_model, tiny_vae
from trainer_inputs import SIZE, face_photos, settings

from comfyui_idfuse.models.errors import TrainingError
from comfyui_idfuse.models.tokens.format import load_id_tokens
from comfyui_idfuse.models.training.photos import prepare_photos
from comfyui_idfuse.models.training.settings import TrainingSettings
from comfyui_idfuse.models.training.token_trainer import IdentityTrainer
from comfyui_idfuse.nodes.glue import training_run
from comfyui_idfuse.nodes.glue.folders import ID_TOKENS_FOLDER, default_folder
from comfyui_idfuse.nodes.glue.training_models import SplicingTextEncoder
from comfyui_idfuse.nodes.glue.training_run import TrainingRun
from comfyui_idfuse.nodes.train import IDFuseTrainIdentity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"steps": 1, "lora_rank": 0, "attention_mode": "off"}
CAPTION = "{} smiling at the camera"


@pytest.fixture(scope="module")
def parts(tokenizer_dir):
    images, masks = face_photos(3)
    return {"model": make_model("sd15"), "clip": make_clip("sd15", tokenizer_dir), "vae": tiny_vae(),
            "images": images, "masks": masks}


def train(parts, save_name: str, images="default", masks="default", training_photos=None, validation_images=None,
          **changes):
    kwargs = settings(save_name=save_name, **changes)
    images = parts["images"] if isinstance(images, str) else images
    masks = parts["masks"] if isinstance(masks, str) else masks
    with torch.inference_mode():  # as ComfyUI runs nodes
        return IDFuseTrainIdentity().train(parts["model"], parts["clip"], parts["vae"], images, masks=masks,
                                           training_photos=training_photos, validation_images=validation_images,
                                           **kwargs)


def report_of(outputs) -> dict:
    return json.loads(outputs[5])


class TrainerSpy:
    """The data and prompt table each IdentityTrainer of a run was made with, and its validation calls."""

    def __init__(self, monkeypatch):
        self.trainers: list[IdentityTrainer] = []
        self.validation_latents: list[torch.Tensor] = []
        made, record = IdentityTrainer.__init__, IdentityTrainer.record_validation

        def init(trainer, *args, **kwargs):
            made(trainer, *args, **kwargs)
            self.trainers.append(trainer)

        def recording(trainer, latents, *args, **kwargs):
            self.validation_latents.append(latents.clone())
            return record(trainer, latents, *args, **kwargs)

        monkeypatch.setattr(IdentityTrainer, "__init__", init)
        monkeypatch.setattr(IdentityTrainer, "record_validation", recording)


# -- images xor training_photos --


def test_neither_or_both_photo_inputs_is_an_error_naming_both(parts):
    for images, photos, said in [(None, None, "neither is connected"), (parts["images"], object(), "both are")]:
        with pytest.raises(TrainingError, match=f"images or from training_photos, and {said}.*Connect exactly one"):
            train(parts, "inputs_none", images=images, training_photos=photos, **SMALL)
    assert not list(Path(default_folder(ID_TOKENS_FOLDER)).glob("inputs_none*"))


def _fake_folder(monkeypatch, parts, templates: list[str | None]):
    """training_photos as IDFuse Load Training Photos gives them: photos_at_resolution is the photo helper's and
    tested with it; here it returns fixed crops, masks and caption templates, and records its arguments."""
    calls = []
    crops = parts["images"][:len(templates)]

    def photos_at_resolution(training_photos, face_analysis, resolution, placeholder=None):
        calls.append((training_photos, face_analysis, resolution, placeholder))
        return crops, parts["masks"][:len(templates)], list(templates)

    monkeypatch.setattr(training_run, "photos_at_resolution", photos_at_resolution)
    return calls


def test_training_photos_give_the_crops_and_their_captions_to_the_trainer(parts, monkeypatch):
    calls = _fake_folder(monkeypatch, parts, [CAPTION, None, CAPTION])
    spy = TrainerSpy(monkeypatch)
    folder, backend = object(), None
    outputs = train(parts, "inputs_captions", images=None, masks=None, training_photos=folder,
                    templates="a photo of the face of {}\na close-up photo of {}", **SMALL)
    assert calls == [(folder, backend, SIZE, "sks")]
    (trainer,) = spy.trainers
    assert trainer.data.photo_templates.tolist() == [2, -1, 2]  # after the two shared templates
    assert trainer.prompts.num_templates == 3 and trainer.prompts.shared_templates == 2
    assert trainer.data.num_photos == 3
    assert outputs[4].shape[0] == 3  # the attention maps: one row per photo
    meta = load_id_tokens(Path(default_folder(ID_TOKENS_FOLDER)) / "inputs_captions.safetensors")
    assert meta.training["captions_sha256"] and meta.training["photos_sha256"]


def test_without_captions_the_prompt_table_is_the_templates(parts, monkeypatch):
    _fake_folder(monkeypatch, parts, [None, None])
    spy = TrainerSpy(monkeypatch)
    train(parts, "inputs_no_captions", images=None, masks=None, training_photos=object(), **SMALL)
    (trainer,) = spy.trainers
    assert trainer.data.photo_templates is None and trainer.prompts.num_templates == 1


def test_masks_with_training_photos_are_refused_before_any_work(parts, monkeypatch):
    """Masks drawn on the photos would not line up with the trainer's face crops."""
    calls = _fake_folder(monkeypatch, parts, [None, None])
    given = torch.zeros(2, SIZE, SIZE)
    given[:, 10:60, 10:60] = 1
    with pytest.raises(TrainingError, match="masks belongs to the images input"):
        train(parts, "inputs_masks_refused", images=None, masks=given, training_photos=object(), **SMALL)
    assert calls == []


def test_a_resumed_run_warns_when_the_captions_changed(parts, monkeypatch, caplog):
    _fake_folder(monkeypatch, parts, [CAPTION, None])
    train(parts, "inputs_resume_captions", images=None, masks=None, training_photos=object(), **SMALL)
    _fake_folder(monkeypatch, parts, ["{} in a garden", None])
    with caplog.at_level(logging.WARNING, logger="idfuse.nodes"):
        train(parts, "inputs_resume_captions", images=None, masks=None, training_photos=object(),
              resume_from="inputs_resume_captions.safetensors", **{**SMALL, "steps": 2})
    assert any("captions differ" in r.getMessage() for r in caplog.records)


def test_caption_templates_are_encoded_beside_the_shared_ones(tokenizer_dir):
    import comfy.model_management

    clip = make_clip("sd15", tokenizer_dir)
    comfy.model_management.load_models_gpu([clip.patcher])
    run_settings = TrainingSettings(templates=("a photo of the face of {}",))
    text = SplicingTextEncoder(clip, "sd15", run_settings, ("a photo of the face of {}", "a tall {} in a hat"))
    assert text.placeholder_positions.tolist() == [7, 3]  # after the start token
    assert len(text.tokens) == len(text.reference_tokens) == 2
    with pytest.raises(TrainingError, match="caption template '{} and {}' .* exactly once.*caption file"):
        SplicingTextEncoder(clip, "sd15", run_settings, ("a photo of the face of {}", "{} and {}"))
    with pytest.raises(TrainingError, match="Prompt template 1 'a photo of {} and sks'"):
        SplicingTextEncoder(clip, "sd15", TrainingSettings(templates=("a photo of {} and sks",)))


# -- the validation loss --


def test_the_last_photo_is_held_out_and_scored_at_0_and_on_the_sample_cadence(parts, monkeypatch):
    spy = TrainerSpy(monkeypatch)
    outputs = train(parts, "inputs_held_out", validation_loss=True, sample_every=2, **{**SMALL, "steps": 3})
    (trainer,) = spy.trainers
    assert trainer.data.num_photos == 2 and outputs[4].shape[0] == 2  # trained on the first two only
    report = report_of(outputs)
    assert report["validation_photos"] == {"images": "the last photo (3 of 3), held out of training", "count": 1}
    assert report["validation_loss"]["steps"] == [0, 2, 3]
    assert report["timing"]["validation_seconds"] > 0 and report["timing"]["sample_rounds"] == 0
    # the held-out latents are the last photo prepared as the training photos are
    run = TrainingRun(parts["model"], parts["clip"], parts["vae"], trainer.settings, "inputs_unused", "none")
    expected = run._encode(prepare_photos(parts["images"][-1:], None, SIZE)[0])
    assert len(spy.validation_latents) == 3
    assert all(torch.equal(latents, expected) for latents in spy.validation_latents)


def test_validation_images_are_scored_and_every_photo_is_trained(parts, monkeypatch):
    spy = TrainerSpy(monkeypatch)
    held_out = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(3))
    outputs = train(parts, "inputs_validation_images", validation_loss=True, sample_every=5,
                    validation_images=held_out, **{**SMALL, "steps": 2})
    (trainer,) = spy.trainers
    assert trainer.data.num_photos == 3
    report = report_of(outputs)
    assert report["validation_photos"] == {"images": "validation_images", "count": 1}
    assert report["validation_loss"]["steps"] == [0, 2]
    assert spy.validation_latents[0].shape == (1, 4, SIZE // 8, SIZE // 8)


def test_validation_needs_two_photos_or_validation_images_and_a_cadence(parts):
    with pytest.raises(TrainingError, match="validation_loss holds the last photo out.*validation_images"):
        train(parts, "inputs_one_photo", images=parts["images"][:1], masks=parts["masks"][:1], validation_loss=True,
              **SMALL)
    with pytest.raises(TrainingError, match="validation_loss is on but sample_every is 0"):
        train(parts, "inputs_no_cadence", validation_loss=True, sample_every=0, **SMALL)


def test_every_report_has_the_timing(parts):
    report = report_of(train(parts, "inputs_timing", **SMALL))
    assert set(report["timing"]) == {"training_seconds", "sampling_seconds", "sample_rounds", "validation_seconds"}
    assert report["timing"]["training_seconds"] > 0
    assert report["validation_photos"] is None and report["validation_loss"] is None
