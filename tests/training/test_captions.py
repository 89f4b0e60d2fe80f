"""Caption templates in the trainer: a photo with a caption is always trained with its own template, a photo
without one draws among the shared templates (settings.templates), and a run without captions draws
exactly what it always did."""

from __future__ import annotations

import pytest
import torch
from factories import make_model
from torch import nn

from comfyui_idfuse.models.errors import TrainingError
from comfyui_idfuse.models.training.loop import step_generator
from comfyui_idfuse.models.training.photos import AUGMENTATIONS, training_variants
from comfyui_idfuse.models.training.probes import AttentionProbes
from comfyui_idfuse.models.training.settings import TrainingSettings
from comfyui_idfuse.models.training.token_trainer import Host, IdentityTrainer, PromptTable, TrainingData

PHOTOS = 3
ROUNDS = 2  # the photos and their flipped copies


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_variant_v_is_a_copy_of_photo_v_modulo_the_photo_count(augmentation):
    """The trainer finds each variant's photo (and so its caption) as v % P: training_variants makes the
    originals, then each flipped or cropped round, every round in photo order."""
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.5, 0.5, 0.5]])
    photos = colours.view(4, 1, 1, 3).expand(4, 32, 48, 3).contiguous()  # one flat colour each: any crop keeps it
    masks = torch.zeros(4, 32, 48)
    masks[:, 8:24, 12:36] = 1
    pixels, variant_masks, originals = training_variants(photos, masks, augmentation, seed=0)
    assert originals.tolist() == list(range(4))
    assert pixels.shape[0] % 4 == 0 and pixels.shape[0] > 4 * ("none" not in augmentation)
    data = TrainingData(torch.zeros(pixels.shape[0], 4, 4, 6), None, originals)
    for variant, photo in enumerate(data.photo_of(torch.arange(pixels.shape[0])).tolist()):
        torch.testing.assert_close(pixels[variant], photos[photo], atol=1e-4, rtol=0)
    if "flip" in augmentation:  # the flipped round is the photos' mirror images, with their masks
        torch.testing.assert_close(variant_masks[4:8], masks.flip(2))


def test_training_data_must_come_in_rounds_of_the_photos():
    with pytest.raises(TrainingError, match="5 variants of 2 photos"):
        TrainingData(torch.zeros(5, 4, 8, 8), None, torch.arange(2))
    with pytest.raises(TrainingError, match="originals"):
        TrainingData(torch.zeros(4, 4, 8, 8), None, torch.tensor([1, 0]))
    with pytest.raises(TrainingError, match=r"photo_templates has shape \(4,\); expected .* \(2,\)"):
        TrainingData(torch.zeros(4, 4, 8, 8), None, torch.arange(2), torch.full((4,), -1))


class _Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.vectors = nn.Parameter(torch.ones(2, 4))

    def forward(self):
        return {"clip_l": self.vectors}, {"clip_l": self.vectors}


def _trainer(photo_templates: list[int] | None, templates: int, shared: int | None = None, seed: int = 0
             ) -> tuple[IdentityTrainer, list[dict[str, torch.Tensor]]]:
    """A trainer on a stand-in model with PHOTOS photos in ROUNDS rounds, ``templates`` prompts of which the
    first ``shared`` are settings.templates; and the list each forward pass's draws are appended to."""
    sampling = make_model("sd15").get_model_object("model_sampling")
    host = Host(encode=lambda template, vectors: vectors["clip_l"].view(1, 1, -1),
                denoise=lambda x, sigma, keys, values, template_list: x * keys.mean(),
                model_sampling=sampling, device=torch.device("cpu"))
    latents = torch.randn(PHOTOS * ROUNDS, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    captions = None if photo_templates is None else torch.tensor(photo_templates)
    data = TrainingData(latents, None, torch.arange(PHOTOS), captions)
    prompts = PromptTable(torch.ones(templates, dtype=torch.long), num_shared_templates=shared)
    settings = TrainingSettings(num_stages=2, steps=2, attention_mode="off", lora_rank=0, batch_size=4, seed=seed)
    trainer = IdentityTrainer(settings, host, data, prompts, AttentionProbes({}, attention=None), _Generator())
    draws = []
    forward = trainer._forward

    def recording_forward(variants, templates, timesteps, noise, with_reference):
        draws.append({"variants": variants, "templates": templates, "timesteps": timesteps, "noise": noise})
        return forward(variants, templates, timesteps, noise, with_reference)

    trainer._forward = recording_forward
    return trainer, draws


def _draw(trainer: IdentityTrainer, steps: int = 40) -> None:
    for step in range(steps):
        trainer._micro_batch(step, 0)


def test_a_photo_with_a_caption_gets_its_template_the_others_draw_a_shared_one():
    # templates 0, 1: settings.templates; 2, 3: captions of photos 2 and 0; photo 1 has none
    trainer, draws = _trainer([3, -1, 2], templates=4, shared=2)
    _draw(trainer)
    variants = torch.cat([d["variants"] for d in draws])
    templates = torch.cat([d["templates"] for d in draws])
    photos = variants % PHOTOS
    assert set(variants.tolist()) == set(range(PHOTOS * ROUNDS))  # every variant, flipped ones too
    assert set(templates[photos == 0].tolist()) == {3}
    assert set(templates[photos == 2].tolist()) == {2}
    assert set(templates[photos == 1].tolist()) == {0, 1}  # both shared templates, never a caption
    loss, _terms = trainer._micro_batch(0, 0)
    assert torch.isfinite(loss)


def test_caption_draws_are_deterministic():
    first, first_draws = _trainer([3, -1, 2], templates=4, shared=2)
    again, again_draws = _trainer([3, -1, 2], templates=4, shared=2)
    other, other_draws = _trainer([3, -1, 2], templates=4, shared=2, seed=1)
    for trainer in (first, again, other):
        _draw(trainer, steps=5)
    assert all(torch.equal(a["variants"], b["variants"]) and torch.equal(a["templates"], b["templates"])
               for a, b in zip(first_draws, again_draws, strict=True))
    assert any(not torch.equal(a["variants"], b["variants"]) for a, b in zip(first_draws, other_draws, strict=True))


def test_without_captions_every_draw_is_as_before():
    """Variants, templates, timesteps and noise in the order drawn before captions existed, from the same
    generator; photo_templates of -1 only or None, and a table without caption templates, change nothing."""
    runs = [_trainer(None, templates=2), _trainer([-1, -1, -1], templates=2), _trainer(None, templates=2, shared=2)]
    for trainer, _draws in runs:
        _draw(trainer, steps=6)
    reference = runs[0][1]
    for step, draw in enumerate(reference):
        rng = step_generator(0, step, 0)
        assert torch.equal(draw["variants"], torch.randint(PHOTOS * ROUNDS, (4,), generator=rng))
        assert torch.equal(draw["templates"], torch.randint(2, (4,), generator=rng))
        assert torch.equal(draw["timesteps"], torch.randint(0, 1000, (4,), generator=rng))
        assert torch.equal(draw["noise"], torch.randn((4, 4, 8, 8), generator=rng))
    for _trainer_of_run, draws in runs[1:]:
        for a, b in zip(reference, draws, strict=True):
            assert all(torch.equal(a[name], b[name]) for name in a)


def test_captions_change_only_the_captioned_samples_templates():
    plain, plain_draws = _trainer(None, templates=2)
    captioned, captioned_draws = _trainer([3, -1, 2], templates=4, shared=2)
    _draw(plain, steps=10)
    _draw(captioned, steps=10)
    captions = torch.tensor([3, -1, 2])
    for a, b in zip(plain_draws, captioned_draws, strict=True):
        for name in ("variants", "timesteps", "noise"):
            assert torch.equal(a[name], b[name])
        caption = captions[a["variants"] % PHOTOS]
        assert torch.equal(b["templates"], torch.where(caption >= 0, caption, a["templates"]))


def test_caption_indices_and_the_shared_count_are_checked():
    with pytest.raises(TrainingError, match=r"photo_templates \[4, -1, 2\] point outside the prompt table of 4"):
        _trainer([4, -1, 2], templates=4, shared=2)
    with pytest.raises(TrainingError, match="point outside"):
        _trainer([-2, -1, 2], templates=4, shared=2)
    for shared in (0, 5):
        with pytest.raises(TrainingError, match=f"num_shared_templates {shared} of a prompt table of 4"):
            PromptTable(torch.ones(4, dtype=torch.long), num_shared_templates=shared)
