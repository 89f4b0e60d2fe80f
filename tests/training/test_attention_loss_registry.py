"""The attention-loss registry: every loss declares what it reads, ``both`` is the sum of its parts, the
node's modes come from the one list, and a loss added to that list is taken by the lookup and the trainer."""

from __future__ import annotations

import pytest
import torch
from factories import make_model
from torch import nn

from comfyui_idfuse.models.errors import TrainingError
from comfyui_idfuse.models.training import losses
from comfyui_idfuse.models.training.losses import (
    ATTENTION_LOSSES,
    ATTENTION_MODES,
    MASK_MODES,
    REFERENCE_MODES,
    AttentionLoss,
    CombinedLoss,
    attention_loss,
    attention_loss_for,
    face_mask_loss,
    reference_loss,
)
from comfyui_idfuse.models.training.probes import AttentionProbes, LayerRecord
from comfyui_idfuse.models.training.settings import TrainingSettings
from comfyui_idfuse.models.training.token_trainer import Host, IdentityTrainer, PromptTable, TrainingData
from comfyui_idfuse.models.unet import BlockKey


def _records(with_reference: bool = True, batch: int = 2) -> list[LayerRecord]:
    gen = torch.Generator().manual_seed(0)
    records = []
    for key, grid in ((BlockKey("input", 7, 0, 2), (8, 8)), (BlockKey("output", 3, 0, 4), (4, 4))):
        cells = grid[0] * grid[1]
        target = torch.rand(batch, cells, generator=gen).softmax(-1)
        reference = torch.rand(batch, cells, generator=gen).softmax(-1)
        records.append(LayerRecord(key, grid, target, reference if with_reference else None))
    return records


def _masks(batch: int = 2) -> torch.Tensor:
    masks = torch.zeros(batch, 32, 32)
    masks[:, 8:24, 10:22] = 1
    return masks


def test_the_node_modes_come_from_the_one_list_in_their_saved_order():
    assert ATTENTION_MODES == ("face_mask", "reference_prompt", "both", "off")
    assert ATTENTION_MODES == tuple(loss.name for loss in ATTENTION_LOSSES)
    assert MASK_MODES == ("face_mask", "both") and REFERENCE_MODES == ("reference_prompt", "both")
    assert all(isinstance(loss, AttentionLoss) for loss in ATTENTION_LOSSES)
    assert all(attention_loss_for(mode).name == mode for mode in ATTENTION_MODES)
    with pytest.raises(TrainingError, match=r"Unknown attention-loss mode 'faces'; use one of face_mask, "):
        attention_loss_for("faces")


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_each_loss_declares_what_it_reads(mode):
    """Without what it declares it raises a TrainingError; what it does not declare changes nothing."""
    loss = attention_loss_for(mode)
    records, masks = _records(), _masks()
    full = loss(records, masks)
    assert full.shape == () and bool(torch.isfinite(full))
    if loss.needs_masks:
        with pytest.raises(TrainingError, match="needs face masks"):
            loss(records, None)
    else:
        torch.testing.assert_close(loss(records, None), full)
    if loss.needs_reference:
        with pytest.raises(TrainingError, match="needs the reference prompt's attention"):
            loss(_records(with_reference=False), masks)
    else:
        torch.testing.assert_close(loss(_records(with_reference=False), masks), full)


def test_the_losses_that_read_something_depend_on_it():
    records, masks = _records(), _masks()
    other_masks = torch.zeros_like(masks)
    other_masks[:, :16] = 1
    face = attention_loss_for("face_mask")
    assert not torch.allclose(face(records, masks), face(records, other_masks))
    moved = [LayerRecord(r.key, r.grid, r.target, r.reference.flip(-1)) for r in records]
    reference = attention_loss_for("reference_prompt")
    assert not torch.allclose(reference(records, masks), reference(moved, masks))
    assert float(attention_loss_for("off")(records, masks)) == 0.0


def test_both_is_the_sum_of_its_parts():
    records, masks = _records(), _masks()
    both = attention_loss_for("both")
    parts = face_mask_loss(records, masks) + reference_loss(records)
    torch.testing.assert_close(both(records, masks), parts)
    torch.testing.assert_close(attention_loss("both", records, masks), parts)
    assert isinstance(both, CombinedLoss) and {p.name for p in both.parts} == {"face_mask", "reference_prompt"}
    # its needs are its parts' needs
    assert both.needs_masks and both.needs_reference
    only_face = CombinedLoss("face_twice", (attention_loss_for("face_mask"),) * 2)
    assert only_face.needs_masks and not only_face.needs_reference
    torch.testing.assert_close(only_face(records, masks), 2 * face_mask_loss(records, masks))


class _ToyLoss(AttentionLoss):
    """Needs masks; returns the mean face share of the masks it got (so the test sees what it was given)."""

    name = "toy"
    needs_masks = True

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def __call__(self, records, masks):
        masks = self.required_masks(masks)
        self.calls.append(masks)
        return masks.float().mean()


@pytest.fixture
def toy(monkeypatch) -> _ToyLoss:
    loss = _ToyLoss()
    monkeypatch.setattr(losses, "ATTENTION_LOSSES", [*ATTENTION_LOSSES, loss])
    return loss


def test_a_loss_added_to_the_list_is_found(toy):
    records, masks = _records(), _masks()
    assert attention_loss_for("toy") is toy
    torch.testing.assert_close(attention_loss("toy", records, masks), masks.mean())
    with pytest.raises(TrainingError, match="use one of .*off, toy"):
        attention_loss_for("faces")


class _Generator(nn.Module):
    """Stands in for the token generator: one K and one V vector per stage."""

    def __init__(self, stages: int = 2, width: int = 4):
        super().__init__()
        self.vectors = nn.Parameter(torch.ones(stages, width))

    def forward(self):
        return {"clip_l": self.vectors}, {"clip_l": self.vectors * 2}


def _trainer(mode: str, with_masks: bool, with_reference: bool = False) -> IdentityTrainer:
    """A trainer on a stand-in host: its x0 prediction is the noisy latent scaled by the context."""
    sampling = make_model("sd15").get_model_object("model_sampling")
    host = Host(encode=lambda template, vectors: vectors["clip_l"].view(1, 1, -1),
                denoise=lambda x, sigma, keys, values, templates: x * keys.mean(),
                model_sampling=sampling, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=gen)
    masks = torch.zeros(3, 8, 8)
    masks[:, 2:6, 2:6] = 1
    data = TrainingData(latents, masks if with_masks else None, torch.arange(3))
    prompts = PromptTable(torch.tensor([1]), torch.zeros(1, 1, 4) if with_reference else None,
                          torch.tensor([0]) if with_reference else None)
    settings = TrainingSettings(num_stages=2, steps=2, attention_mode=mode, lora_rank=0)
    return IdentityTrainer(settings, host, data, prompts, AttentionProbes({}, attention=None), _Generator())


def test_the_trainer_asks_the_loss_what_it_needs(toy):
    with pytest.raises(TrainingError, match="Attention-loss mode 'toy' needs face masks"):
        _trainer("toy", with_masks=False)
    with pytest.raises(TrainingError, match="Attention-loss mode 'reference_prompt' needs the reference prompts"):
        _trainer("reference_prompt", with_masks=True)
    with pytest.raises(TrainingError, match="Unknown attention-loss mode 'faces'"):
        _trainer("faces", with_masks=True)
    _trainer("both", with_masks=True, with_reference=True)  # both needs met
    trainer = _trainer("toy", with_masks=True)
    assert trainer.attention_loss is toy
    losses_of_step = trainer.train_step()
    (given,) = toy.calls  # one micro-batch, the masks of its photos
    assert given.shape == (1, 8, 8)
    assert losses_of_step.attention == pytest.approx(float(given.mean()))


class _ReferenceToy(AttentionLoss):
    name = "reference_toy"
    needs_reference = True

    def __call__(self, records, masks):
        return torch.zeros(())


@pytest.mark.parametrize(("loss", "reads_reference"), [(_ToyLoss(), False), (_ReferenceToy(), True)])
def test_the_probes_compute_the_reference_only_for_a_loss_that_reads_it(loss, reads_reference, monkeypatch):
    monkeypatch.setattr(losses, "ATTENTION_LOSSES", [*ATTENTION_LOSSES, loss])
    trainer = _trainer(loss.name, with_masks=True, with_reference=True)
    batches = []
    begin = trainer.probes.begin
    monkeypatch.setattr(trainer.probes, "begin", lambda batch: (batches.append(batch), begin(batch)))
    trainer.train_step()
    assert len(batches) == 1 and (batches[0].reference_context is not None) == reads_reference
