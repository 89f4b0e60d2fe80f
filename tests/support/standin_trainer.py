"""A trainer on a stand-in host whose losses are known functions of its parameters, for the tests of
what the trainer does with the losses (gradient measurement, learning-rate schedule, resume)."""

from __future__ import annotations

import torch
from factories import make_model
from torch import nn

from comfyui_idfuse.models.training.probes import AttentionProbes
from comfyui_idfuse.models.training.settings import TrainingSettings
from comfyui_idfuse.models.training.token_trainer import Host, IdentityTrainer, PromptTable, TrainingData

LAMBDA = 0.5
REFERENCE_SCALE = 4.0  # reference_loss_scale


class _Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.vectors = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))

    def forward(self):
        return {"clip_l": self.vectors}, {"clip_l": self.vectors}


def analytic_trainer(monkeypatch, adapters: bool = False, accumulation: int = 1, **settings) -> IdentityTrainer:
    """A trainer whose losses are known functions of its parameters (v: the generator's, w: the adapter's):
    diffusion = Σv² + Σw², face_mask = Σv + 2Σw, reference_prompt = 3Σv (per micro-batch); λ = LAMBDA and
    reference_loss_scale = REFERENCE_SCALE unless given."""
    sampling = make_model("sd15").get_model_object("model_sampling")
    host = Host(encode=lambda template, vectors: vectors["clip_l"].view(1, 1, -1),
                denoise=lambda x, sigma, keys, values, templates: x, model_sampling=sampling,
                device=torch.device("cpu"))
    data = TrainingData(torch.zeros(2, 4, 8, 8), torch.ones(2, 8, 8), torch.arange(2))
    prompts = PromptTable(torch.tensor([1]), torch.zeros(1, 1, 2), torch.tensor([0]))
    lora = nn.ModuleDict({"layer": nn.Linear(2, 1, bias=False)}) if adapters else None
    if lora is not None:
        with torch.no_grad():
            lora["layer"].weight.copy_(torch.tensor([[0.5, -2.0]]))
    options = {"num_stages": 2, "steps": 3, "attention_mode": "both", "attention_weight": LAMBDA,
               "reference_loss_scale": REFERENCE_SCALE, "lora_rank": 0,
               "gradient_accumulation": accumulation, **settings}
    trainer = IdentityTrainer(TrainingSettings(**options), host, data, prompts, AttentionProbes({}, attention=None),
                              _Generator(), lora)

    def micro_batch(self, step, micro):
        v = self.generator.vectors
        w = self.adapters["layer"].weight if self.adapters is not None else torch.zeros(1)
        return (v ** 2).sum() + (w ** 2).sum(), {"face_mask": v.sum() + 2 * w.sum(), "reference_prompt": 3 * v.sum()}

    monkeypatch.setattr(IdentityTrainer, "_micro_batch", micro_batch)
    return trainer
