"""The trainer loads the UNet and the text encoder once per run and encodes its prompts without
re-entering ComfyUI's model management (clip.encode_from_tokens calls load_models_gpu on every
prompt, which can partially unload the UNet being trained); the encodings stay those of
clip.encode_from_tokens, bit for bit."""

from __future__ import annotations

import comfy.model_management
import pytest
import torch
from factories import make_clip, make_model, tiny_vae
from trainer_inputs import face_photos, train_node

from comfyui_idfuse.models.tokens.format import ENCODERS
from comfyui_idfuse.models.training.settings import TrainingSettings
from comfyui_idfuse.models.training.token_trainer import IdentityTrainer
from comfyui_idfuse.nodes.glue import training_models
from comfyui_idfuse.nodes.glue.training_models import SplicingTextEncoder, encode_loaded


class LoadCalls:
    """Every load_models_gpu call (CLIP.load_model goes through it too), and whether it came while
    the trainer was training or evaluating."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[bool, list[str]]] = []
        self.inside = False
        original = comfy.model_management.load_models_gpu

        def counting(models, *args, **kwargs):
            self.calls.append((self.inside, [type(m.model).__name__ for m in models]))
            return original(models, *args, **kwargs)

        monkeypatch.setattr(comfy.model_management, "load_models_gpu", counting)

    def inside_trainer(self, method):
        def wrapped(*args, **kwargs):
            self.inside = True
            try:
                return method(*args, **kwargs)
            finally:
                self.inside = False
        return wrapped

    @property
    def from_inside(self) -> list[list[str]]:
        return [models for inside, models in self.calls if inside]


def _unet_loaded_state(base_model) -> list[tuple]:
    """What model management holds of the UNet: its entries, their device, loaded size and where the
    weights are."""
    return [(type(lm.model).__name__, lm.device, lm.model.loaded_size(),
             sorted({str(p.device) for p in lm.model.model.parameters()}))
            for lm in comfy.model_management.current_loaded_models
            if lm.model is not None and lm.model.model is base_model]


def test_training_does_not_reenter_model_management(tokenizer_dir, monkeypatch):
    model, clip, vae = make_model("sd15"), make_clip("sd15", tokenizer_dir), tiny_vae()
    images, masks = face_photos(1)
    loads = LoadCalls(monkeypatch)
    states = []
    train_step, evaluate = IdentityTrainer.train_step, IdentityTrainer.evaluate

    def recording_step(trainer):
        losses = loads.inside_trainer(train_step)(trainer)
        states.append(_unet_loaded_state(model.model))
        return losses

    monkeypatch.setattr(IdentityTrainer, "train_step", recording_step)
    monkeypatch.setattr(IdentityTrainer, "evaluate", loads.inside_trainer(evaluate))
    train_node(model, clip, vae, images, masks, "model_management", steps=3, lora_rank=2, num_stages=2,
               attention_mode="both")
    assert loads.from_inside == []  # no prompt encoding, step or evaluation loads a model
    set_up = [models for _inside, models in loads.calls]
    assert any("BaseModel" in models and "SD1ClipModel" in models for models in set_up)  # the run's one load
    assert len(states) == 3 and states[0]  # the UNet is loaded...
    assert all(state == states[0] for state in states)  # ...and stays as it was, step after step


def _same(got: tuple, expected: tuple) -> bool:
    return all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
               for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("clip_layer", [None, -2])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_encodings_are_those_of_encode_from_tokens(family, clip_layer, tokenizer_dir, monkeypatch):
    clip = make_clip(family, tokenizer_dir)
    if clip_layer is not None:  # as CLIP Set Last Layer does
        clip = clip.clone()
        clip.clip_layer(clip_layer)
    comfy.model_management.load_models_gpu([clip.patcher])
    settings = TrainingSettings(templates=("a photo of the face of {}", "{} smiling"))
    text = SplicingTextEncoder(clip, family, settings)
    gen = torch.Generator().manual_seed(0)
    vectors = {name: torch.randn(width, generator=gen) for name, width in ENCODERS[family].items()}
    loads = LoadCalls(monkeypatch)
    with text.hooks():
        spliced = [text.encode(t, vectors) for t in range(2)]
        references = [text.encode_reference(t) for t in range(2)]
    plain = encode_loaded(clip, text.tokens[0], return_pooled=True)
    assert loads.calls == []

    def encode_from_tokens(clip, tokens, return_pooled=False):
        return clip.encode_from_tokens(tokens, return_pooled=return_pooled)

    monkeypatch.setattr(training_models, "encode_loaded", encode_from_tokens)  # the path before: same inputs
    with text.hooks():
        for t in range(2):
            assert torch.equal(spliced[t], text.encode(t, vectors))
            expected_cond, expected_pooled = text.encode_reference(t)
            assert _same(references[t], (expected_cond, expected_pooled))
    assert _same(plain, clip.encode_from_tokens(text.tokens[0], return_pooled=True))
    if family == "sdxl":
        assert plain[1] is not None  # the pooled output is compared too
    assert not torch.equal(spliced[0], plain[0])  # the vectors were spliced in
    assert len(loads.calls) > 0  # encode_from_tokens does load: the counter sees it
