"""The trainer's optimisers (models/training/optimizers): the registry is the widget's vocabulary, each kind
is offered only where it can run and is refused otherwise with the fix, and each kind's state (moments,
Prodigy's d and its other group values, bitsandbytes' quantised moments) survives a save and resume
through loop.py bit for bit; Prodigy trains an identity through the node and resumes exactly.

AdamW8bit: its availability and errors are tested with a fake bitsandbytes module; its real state round
trip runs where bitsandbytes is installed (its 8-bit optimisers also run on a CPU, as 0.50 does; the kind
still offers it only with CUDA, so the test pretends there is one).
"""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from factories import make_clip, make_model, tiny_vae
from safetensors.torch import load, save
from torch import nn
from trainer_inputs import face_photos, train_node

from comfyui_idfuse.models.errors import TrainingError
from comfyui_idfuse.models.training.loop import (
    OPTIMIZER_KIND_KEY,
    advance_lr_scheduler,
    load_optimizer_state,
    make_lr_scheduler,
    optimizer_state,
    optimizer_step,
    step_generator,
)
from comfyui_idfuse.models.training.optimizers import (
    OPTIMIZER_KINDS,
    available_optimizers,
    kind_of,
    make_optimizer,
    optimizer_kind,
)
from comfyui_idfuse.models.training.settings import DEFAULTS, OPTIMIZERS
from comfyui_idfuse.models.training.token_trainer import IdentityTrainer
from comfyui_idfuse.nodes.glue.training_options import available_optimizers as widget_optimizers
from comfyui_idfuse.nodes.glue.training_options import check_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEARNING_RATES = {"AdamW": 0.05, "AdamW8bit": 0.05, "Prodigy": 1.0}
# The linear map the test model learns (a steady target, so Prodigy's step size grows within a few steps).
TEACHER = torch.randn(64, 96, generator=torch.Generator().manual_seed(5))


def _real_bitsandbytes() -> types.ModuleType:
    try:
        import bitsandbytes
    except Exception as e:  # noqa: BLE001 - any failure to import means it cannot be tested here
        pytest.skip(f"bitsandbytes does not import here ({type(e).__name__}: {e})")
    return bitsandbytes


@pytest.fixture
def with_cuda(monkeypatch):
    """torch says there is a CUDA GPU (the AdamW8bit kind offers itself only then)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def fake_bitsandbytes(monkeypatch, with_cuda):
    """A bitsandbytes whose AdamW8bit is torch's AdamW under that name (records its arguments)."""

    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, params, lr, weight_decay):
            super().__init__(params, lr=lr, weight_decay=weight_decay)
            self.arguments = {"lr": lr, "weight_decay": weight_decay}

    package = types.ModuleType("bitsandbytes")
    package.optim = types.ModuleType("bitsandbytes.optim")
    package.optim.AdamW8bit = AdamW8bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", package)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", package.optim)
    return package


def _without(monkeypatch, package: str) -> None:
    """``import package`` raises ImportError, as where it is not installed."""
    for name in [n for n in sys.modules if n == package or n.startswith(f"{package}.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)


# --- the registry ------------------------------------------------------------------------------

def test_the_registry_is_the_settings_vocabulary_in_its_order():
    assert tuple(kind.name for kind in OPTIMIZER_KINDS) == OPTIMIZERS
    assert DEFAULTS.optimizer == "AdamW" and "AdamW" in available_optimizers()
    assert widget_optimizers() == available_optimizers()
    with pytest.raises(TrainingError, match=r"optimizer 'Adam' is not one of AdamW, AdamW8bit, Prodigy"):
        make_optimizer("Adam", [nn.Parameter(torch.zeros(1))], 1e-3)


def test_adamw_is_torchs_adamw_without_weight_decay():
    torch.manual_seed(0)
    parameters = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(2, 3))]
    reference = [nn.Parameter(p.detach().clone()) for p in parameters]
    ours = make_optimizer("AdamW", parameters, 1e-3)
    theirs = torch.optim.AdamW(reference, lr=1e-3, weight_decay=0.0)
    assert type(ours) is torch.optim.AdamW and kind_of(ours) is optimizer_kind("AdamW")
    assert ours.param_groups[0]["lr"] == 1e-3 and ours.param_groups[0]["weight_decay"] == 0.0
    for step in range(3):
        for group, optimizer in ((parameters, ours), (reference, theirs)):
            optimizer.zero_grad()
            sum((p * torch.randn(p.shape, generator=step_generator(1, step))).sum() ** 2 for p in group).backward()
            optimizer.step()
    for a, b in zip(parameters, reference, strict=True):
        assert torch.equal(a, b)


def test_adamw8bit_is_not_offered_nor_run_without_cuda(monkeypatch, fake_bitsandbytes):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "AdamW8bit" not in available_optimizers() and "AdamW8bit" not in widget_optimizers()
    expected = (r"optimizer AdamW8bit \(IDFuse Training Options\) cannot run here: it needs a CUDA GPU .*Choose "
                r"AdamW, or train on a machine with a CUDA GPU and bitsandbytes installed \(pip install bitsandbytes\)")
    with pytest.raises(TrainingError, match=expected):
        make_optimizer("AdamW8bit", [nn.Parameter(torch.zeros(1))], 1e-3)
    with pytest.raises(TrainingError, match=expected):  # a saved workflow that names it, on this machine
        check_optimizer("AdamW8bit")


def test_adamw8bit_is_not_offered_with_cuda_but_without_bitsandbytes(monkeypatch, with_cuda):
    _without(monkeypatch, "bitsandbytes")
    assert "AdamW8bit" not in available_optimizers()
    with pytest.raises(TrainingError, match=r"AdamW8bit .*needs the bitsandbytes package, which does not import "
                                            r"here \((ModuleNotFound|Import)Error.*Install it \(pip install bitsandbytes\), or "
                                            r"choose AdamW"):
        make_optimizer("AdamW8bit", [nn.Parameter(torch.zeros(1))], 1e-3)


def test_adamw8bit_with_cuda_and_bitsandbytes_is_offered_and_made_without_weight_decay(fake_bitsandbytes):
    assert available_optimizers() == ["AdamW", "AdamW8bit", "Prodigy"]
    assert check_optimizer("AdamW8bit") == "AdamW8bit"
    optimizer = make_optimizer("AdamW8bit", [nn.Parameter(torch.zeros(1))], 2e-4)
    assert type(optimizer) is fake_bitsandbytes.optim.AdamW8bit
    assert optimizer.arguments == {"lr": 2e-4, "weight_decay": 0.0}
    assert kind_of(optimizer) is optimizer_kind("AdamW8bit")


def test_prodigy_without_prodigyopt_is_not_offered_and_says_how_to_install_it(monkeypatch):
    _without(monkeypatch, "prodigyopt")
    assert "Prodigy" not in available_optimizers()
    message = r"optimizer Prodigy \(IDFuse Training Options\) cannot run here: .*pip install prodigyopt.*choose AdamW"
    with pytest.raises(TrainingError, match=message):
        make_optimizer("Prodigy", [nn.Parameter(torch.zeros(1))], 1.0)
    with pytest.raises(TrainingError, match=message):
        check_optimizer("Prodigy")


def test_prodigy_is_made_with_the_given_rate_and_no_weight_decay_and_warns_far_from_one(caplog):
    from prodigyopt import Prodigy

    with caplog.at_level(logging.WARNING, logger="idfuse.training"):
        optimizer = make_optimizer("Prodigy", [nn.Parameter(torch.zeros(1))], 1.0)
    assert type(optimizer) is Prodigy and kind_of(optimizer) is optimizer_kind("Prodigy")
    assert optimizer.param_groups[0]["lr"] == 1.0 and optimizer.param_groups[0]["weight_decay"] == 0.0
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="idfuse.training"):
        make_optimizer("Prodigy", [nn.Parameter(torch.zeros(1))], 1e-4)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "learning_rate 0.0001 with the Prodigy optimizer" in record.getMessage()
    assert "so 1.0 is its convention" in record.getMessage()


# --- state round trip through loop.py --------------------------------------------------------------

def _model(seed: int) -> nn.Module:
    """A 6144-element weight (bitsandbytes quantises the moments of tensors of 4096 elements and more) and
    a small bias (kept in 32 bits)."""
    torch.manual_seed(seed)
    return nn.Linear(64, 96)


def _optimizer_and_schedule(kind: str, model: nn.Module, total_steps: int):
    optimizer = make_optimizer(kind, model.parameters(), LEARNING_RATES[kind])
    return optimizer, make_lr_scheduler("cosine", optimizer, warmup_steps=2, total_steps=total_steps)


def _train(model: nn.Module, optimizer, scheduler, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        rng = step_generator(3, step)
        inputs = torch.randn(8, 64, generator=rng)
        loss = (model(inputs) - inputs @ TEACHER).square().mean()
        loss.backward()
        optimizer_step(optimizer, list(model.parameters()), step + 1, {"loss": float(loss.detach())}, None)
        scheduler.step()


def _through_a_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """What a .trainstate gives back: the tensors through safetensors, the metadata as strings."""
    assert all(isinstance(v, str) for v in metadata.values())
    return load(save(tensors, metadata=metadata)), dict(metadata)


def _round_trip(kind: str, total: int = 8, cut: int = 4):
    """An uninterrupted run and one cut at ``cut``, saved, loaded by a fresh optimiser and finished."""
    full = _model(0)
    full_optimizer, full_schedule = _optimizer_and_schedule(kind, full, total)
    _train(full, full_optimizer, full_schedule, range(total))

    first = _model(0)
    first_optimizer, first_schedule = _optimizer_and_schedule(kind, first, total)
    _train(first, first_optimizer, first_schedule, range(cut))
    tensors, metadata = _through_a_file(*optimizer_state(first_optimizer, cut, None))

    resumed = _model(1)  # other initial weights: everything must come from the saved state
    resumed.load_state_dict(first.state_dict())
    resumed_optimizer, resumed_schedule = _optimizer_and_schedule(kind, resumed, total)
    assert load_optimizer_state(resumed_optimizer, tensors, metadata, None, "hint") == cut
    advance_lr_scheduler(resumed_schedule, cut)
    _train(resumed, resumed_optimizer, resumed_schedule, range(cut, total))
    return {"full": (full, full_optimizer), "resumed": (resumed, resumed_optimizer), "saved": (tensors, metadata)}


def _assert_same_run(runs) -> None:
    (full, full_optimizer), (resumed, resumed_optimizer) = runs["full"], runs["resumed"]
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [{k: v for k, v in g.items() if k != "params"} for g in resumed_optimizer.param_groups] == \
        [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
         for g in full_optimizer.param_groups]


def test_adamw_state_resumes_bit_for_bit_and_is_saved_as_before():
    runs = _round_trip("AdamW")
    _assert_same_run(runs)
    tensors, metadata = runs["saved"]
    # As 0.4.0 wrote it (older versions of the pack read it): no kind, every entry a tensor.
    assert set(metadata) == {"step", "param_groups"}
    assert sorted(tensors) == [f"optimizer.{i}.{name}" for i in (0, 1) for name in ("exp_avg", "exp_avg_sq", "step")]


def test_prodigy_state_and_its_step_size_resume_bit_for_bit():
    runs = _round_trip("Prodigy")
    _assert_same_run(runs)
    full_optimizer = runs["full"][1]
    group = full_optimizer.param_groups[0]
    assert group["d"] > group["d0"]  # it did adapt its step size, and the resumed run has the same d (above)
    tensors, metadata = runs["saved"]
    assert metadata[OPTIMIZER_KIND_KEY] == "Prodigy"
    assert {name.split(".", 2)[2] for name in tensors} == {"s", "p0", "exp_avg", "exp_avg_sq"}
    assert isinstance(runs["resumed"][1].state[runs["resumed"][0].weight]["step"], int)  # as Prodigy keeps it


def test_adamw8bit_state_with_its_quantised_moments_resumes_bit_for_bit(monkeypatch):
    bitsandbytes = _real_bitsandbytes()  # imported as on this machine, before torch claims a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    runs = _round_trip("AdamW8bit")
    assert type(runs["full"][1]) is bitsandbytes.optim.AdamW8bit
    _assert_same_run(runs)
    tensors, metadata = runs["saved"]
    assert metadata[OPTIMIZER_KIND_KEY] == "AdamW8bit"
    quantised = {name: t.dtype for name, t in tensors.items() if name.startswith("optimizer.0.")}
    assert quantised["optimizer.0.__bnb_optimizer_quant_state__.state1"] == torch.uint8  # the 8-bit moments
    assert "optimizer.0.__bnb_optimizer_quant_state__.absmax1" in quantised  # and their block scales
    assert tensors["optimizer.1.__bnb_optimizer_quant_state__.state1"].dtype == torch.float32  # the small bias
    resumed, resumed_optimizer = runs["resumed"]
    assert isinstance(resumed_optimizer.state[resumed.weight]["step"], int)  # as bitsandbytes keeps it


@pytest.mark.parametrize("saved, loading", [("Prodigy", "AdamW"), ("AdamW", "Prodigy")])
def test_a_state_of_another_optimizer_is_refused_naming_both(saved, loading):
    model = _model(0)
    optimizer, schedule = _optimizer_and_schedule(saved, model, 4)
    _train(model, optimizer, schedule, range(1))
    tensors, metadata = optimizer_state(optimizer, 1, None)
    other = make_optimizer(loading, model.parameters(), LEARNING_RATES[loading])
    with pytest.raises(TrainingError, match=rf"state of the {saved} optimizer, this run uses {loading}: set "
                                            rf"optimizer to {saved} \(IDFuse Training Options\)"):
        load_optimizer_state(other, tensors, metadata, None, "hint")


# --- an identity trained with Prodigy ----------------------------------------------------------------

@pytest.fixture(scope="module")
def parts(tokenizer_dir):
    images, masks = face_photos()
    return {"model": make_model("sd15"), "clip": make_clip("sd15", tokenizer_dir), "vae": tiny_vae(),
            "images": images, "masks": masks}


def _train_identity(parts, save_name: str, **changes):
    """A warm-up (its rate scales Prodigy's d) but no decay: a decaying schedule is made for the first run's
    total, so a 2-step run resumed to 4 would rightly differ from a 4-step run."""
    return train_node(parts["model"], parts["clip"], parts["vae"], parts["images"], parts["masks"], save_name,
                      optimizer="Prodigy", learning_rate=1.0, lr_schedule="constant", warmup_steps=1,
                      attention_mode="face_mask", lora_rank=2, **changes)


def test_an_identity_trains_with_prodigy_and_resumes_exactly(parts, monkeypatch):
    from prodigyopt import Prodigy

    seen = {}
    original = IdentityTrainer.train_step

    def spy(self):
        if self.step == 0:
            seen["before"] = [p.detach().clone() for p in self.parameters()]
        losses = original(self)
        seen["optimizer"], seen["after"], seen["losses"] = self.optimizer, list(self.parameters()), losses
        return losses

    monkeypatch.setattr(IdentityTrainer, "train_step", spy)
    full = _train_identity(parts, "prodigy_full", steps=4)[0]
    assert type(seen["optimizer"]) is Prodigy
    assert all(torch.isfinite(torch.tensor(value)) for value in vars(seen["losses"]).values()
               if isinstance(value, float))
    moved = [not torch.equal(a, b) for a, b in zip(seen["before"], seen["after"], strict=True)]
    assert all(moved), f"{moved.count(False)} of {len(moved)} parameters did not move"

    _train_identity(parts, "prodigy_cut", steps=2)
    resumed = _train_identity(parts, "prodigy_cut", steps=4, resume_from="prodigy_cut.safetensors")[0]
    for name in full.keys:
        assert torch.equal(resumed.keys[name], full.keys[name]), name
        assert torch.equal(resumed.values[name], full.values[name]), name
