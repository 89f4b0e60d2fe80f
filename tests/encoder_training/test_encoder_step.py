"""Identity-enhanced training of an ID encoder, one step at a time, on small SD1.5/SDXL UNets (ComfyUI's own
classes through ComfyUI's apply_model): text attention off/on, which parameters train, the loss in the model's
parameterisation, Min-SNR, ID dropout, per-sample draws, EMA, precision, checkpointing, the frozen model left
as it was."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from encoder_parts import clip_uncond, make_training, pair_batch, small_encoder

from comfyui_idfuse.models.errors import TrainingError, TrainingSettingsError, UnsupportedModelError
from comfyui_idfuse.models.training.encoder_settings import (
    ENCODER_DEFAULTS,
    STEP_SETTINGS,
    EncoderTrainingSettings,
    encoder_setting_range,
)
from comfyui_idfuse.models.training.encoder_trainer import EncoderEMA, EncoderTraining, draw_samples
from comfyui_idfuse.models.unet import CONTEXT_DIM, block_keys
from comfyui_idfuse.nodes.glue.encoder_training import checkpoint_models, encode_crops, training_denoiser

ID_TOKENS = 8  # small_encoder: 4 face + 4 CLIP tokens
LEARNING_STEPS = 24
ROWS = {"sd15": 2, "sdxl": 1}  # SDXL's ten-deep transformers are slow on a CPU: one sample is enough there


def record_attention(denoiser) -> list[int]:
    """The number of key tokens of every attention call the ID cross-attention makes."""
    calls: list[int] = []
    attention = denoiser.id_attention.attention

    def counting(q, k, v, heads, **kwargs):
        calls.append(k.shape[1])
        return attention(q, k, v, heads, **kwargs)

    denoiser.id_attention.attention = counting
    return calls


def spy_on_denoiser(training: EncoderTraining) -> dict:
    """What the step gives the denoiser and gets back, kept in the returned dict."""
    seen: dict = {}
    original = training.denoiser

    def denoiser(x_noisy, sigma, id_kv, prompts_context, prompts_pooled=None):
        seen.update(x_noisy=x_noisy, sigma=sigma, id_kv=id_kv, prediction=original(x_noisy, sigma, id_kv,
                                                                                    prompts_context, prompts_pooled))
        return seen["prediction"]

    denoiser.model_sampling = original.model_sampling
    object.__setattr__(training, "denoiser", denoiser)
    return seen


# --- text attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_with_text_attention_off_the_prompt_changes_nothing_and_is_never_attended(unet, family):
    training, denoiser = make_training(unet(family), text_attention="off")
    calls = record_attention(denoiser)
    batch = pair_batch(ROWS[family], context_dim=CONTEXT_DIM[family], with_prompts=True)
    # A prompt the UNet could not survive: NaN everywhere (pooled text too).
    poisoned = replace(batch, prompts_context=torch.full_like(batch.prompts_context, float("nan")),
                       prompts_pooled=None if batch.prompts_pooled is None else
                       torch.full_like(batch.prompts_pooled, float("nan")))
    with denoiser, torch.no_grad():
        loss = training(batch, 3)
        per_pass = list(calls)
        loss_poisoned = training(poisoned, 3)
    assert torch.isfinite(loss) and torch.equal(loss, loss_poisoned)
    # One attention per cross-attention layer, on the ID tokens only: the text keys are never attended to.
    assert len(per_pass) == len(block_keys(family))
    assert set(per_pass) == {ID_TOKENS}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_with_text_attention_on_the_prompt_changes_the_prediction(unet, family):
    training, denoiser = make_training(unet(family), text_attention="on")
    calls = record_attention(denoiser)
    batch = pair_batch(ROWS[family], context_dim=CONTEXT_DIM[family], with_prompts=True)
    other = pair_batch(ROWS[family], seed=5, context_dim=CONTEXT_DIM[family], with_prompts=True)
    other = replace(batch, prompts_context=other.prompts_context, prompts_pooled=other.prompts_pooled)
    with denoiser, torch.no_grad():
        loss = training(batch, 3)
        per_pass = list(calls)
        loss_other = training(other, 3)
        with pytest.raises(TrainingError, match="prompts_context"):
            training(replace(batch, prompts_context=None), 3)
    assert torch.isfinite(loss) and torch.isfinite(loss_other)
    assert not torch.allclose(loss, loss_other)
    # Every layer attends to the text (77 tokens) and to the ID tokens.
    assert len(per_pass) == 2 * len(block_keys(family))
    assert sorted(set(per_pass)) == [ID_TOKENS, 77]


# --- what trains ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_gradients_reach_exactly_the_trainable_parameters(unet, family):
    model = unet(family)
    training, denoiser = make_training(model, id_dropout=0.0)
    with denoiser:
        training(pair_batch(ROWS[family], context_dim=CONTEXT_DIM[family]), 0).backward()
    encoder = training.encoder
    # DDP/accelerate see exactly the encoder's parameters.
    assert [name for name, _ in training.named_parameters()] == [f"encoder.{n}" for n, _ in encoder.named_parameters()]
    assert {id(p) for p in training.trainable_parameters()} == {id(p) for p in encoder.parameters()}
    for name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for key in block_keys(family):  # every layer's ID K/V
        projection = encoder.projection(key)
        assert projection.to_k.weight.grad.abs().sum() > 0 and projection.to_v.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.parameters())


def test_a_frozen_clip_mapper_gets_no_gradient(unet):
    training, denoiser = make_training(unet("sd15"), id_dropout=0.0, train_clip_mapper=False)
    with denoiser:
        training(pair_batch(), 0).backward()
    encoder = training.encoder
    assert all(not p.requires_grad and p.grad is None for p in encoder.clip_mapper.parameters())
    trained = {id(p) for p in training.trainable_parameters()}
    assert trained == {id(p) for p in [*encoder.face_mapper.parameters(), *encoder.ip_projections.parameters()]}
    assert all(p.grad is not None for p in training.trainable_parameters())


def _fixed_pairs() -> list:
    return [pair_batch(size=1, seed=10), pair_batch(size=1, seed=11, first_id=1)]


def _mean_loss(training, pairs, step: int) -> float:
    with torch.no_grad():
        return sum(float(training(batch, step)) for batch in pairs) / len(pairs)


def test_the_loss_falls_over_a_few_dozen_steps_on_a_fixed_pair_set(unet):
    training, denoiser = make_training(unet("sd15"), learning_rate=3e-3, id_dropout=0.0)
    optimizer = torch.optim.AdamW(training.trainable_parameters(), lr=training.settings.learning_rate,
                                  weight_decay=training.settings.weight_decay)
    pairs = _fixed_pairs()
    held_out_step = 10 ** 6  # the same noise and timesteps before and after
    with denoiser:
        before = _mean_loss(training, pairs, held_out_step)
        for step in range(LEARNING_STEPS):
            optimizer.zero_grad()
            training(pairs[step % len(pairs)], step).backward()
            optimizer.step()
        after = _mean_loss(training, pairs, held_out_step)
    assert after < 0.9 * before, (before, after)


# --- the loss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_loss_is_the_mse_of_the_models_own_parameterisation(unet, prediction):
    training, denoiser = make_training(unet("sd15", prediction))
    seen = spy_on_denoiser(training)
    batch = pair_batch(size=3)
    with denoiser, torch.no_grad():
        loss = training(batch, 7)
    draws = training.draw(batch, 7)
    x0, noise = batch.target_latents, draws.noise
    sigma = seen["sigma"].view(-1, 1, 1, 1)
    assert torch.allclose(seen["x_noisy"], x0 + sigma * noise)
    x_noisy, x0_pred = seen["x_noisy"], seen["prediction"]
    if prediction == "eps":
        predicted, target = (x_noisy - x0_pred) / sigma, noise
    else:  # v = alpha * eps - sigma_t * x0, with alpha = 1 / sqrt(1 + sigma²), sigma_t = sigma / sqrt(1 + sigma²)
        scale = (sigma ** 2 + 1).sqrt()
        predicted = (x_noisy / (sigma ** 2 + 1) - x0_pred) * scale / sigma
        target = (noise - sigma * x0) / scale
    assert torch.allclose(loss, ((predicted - target) ** 2).mean(), rtol=1e-4)


def test_other_parameterisations_are_refused(unet):
    import comfy.model_sampling

    # x0 prediction where this ComfyUI has it (newer cores), else flow (CONST): neither is eps or v.
    prediction = getattr(comfy.model_sampling, "X0", comfy.model_sampling.CONST)

    class OtherPrediction(comfy.model_sampling.ModelSamplingDiscrete, prediction):
        pass

    model = unet("sd15").clone()
    model.add_object_patch("model_sampling", OtherPrediction(model.model.model_config))
    with pytest.raises(UnsupportedModelError, match="eps or v"):
        training_denoiser(model, EncoderTrainingSettings())


def test_min_snr_weight_matches_an_independent_formula(unet):
    gamma = 2.0
    training, denoiser = make_training(unet("sd15"), min_snr_gamma=gamma)
    batch = pair_batch(size=4)
    # A step whose timesteps have SNRs on both sides of gamma, so the clamp is exercised.
    sigmas = training.denoiser.model_sampling.sigmas
    step = next(s for s in range(100) if len({bool(sigmas[t] ** -2 > gamma) for t in training.draw(batch, s).timesteps})
                == 2)
    seen = spy_on_denoiser(training)
    with denoiser, torch.no_grad():
        loss = training(batch, step)
    snr = seen["sigma"] ** -2  # alphā / (1 - alphā) on the VP schedule
    weight = torch.minimum(snr, torch.tensor(gamma))
    per_sample = ((seen["prediction"] - batch.target_latents) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, (weight * per_sample).mean(), rtol=1e-4)


# --- draws and ID dropout ------------------------------------------------------------------------

def test_id_dropout_rate_is_respected_and_draws_depend_only_on_seed_step_and_sample():
    ids = torch.arange(4000)
    draws = draw_samples(0, 3, ids, (1,), 1000, 0.25)
    assert abs(draws.dropped.float().mean().item() - 0.25) < 0.02  # 3 standard deviations
    assert not draw_samples(0, 3, ids[:200], (1,), 1000, 0.0).dropped.any()
    assert draw_samples(0, 3, ids[:200], (1,), 1000, 1.0).dropped.all()
    # Split over two processes, the samples draw what one process draws.
    whole = draw_samples(1, 5, torch.arange(8), (4, 2, 2), 1000, 0.5)
    halves = [draw_samples(1, 5, torch.arange(i, i + 4), (4, 2, 2), 1000, 0.5) for i in (0, 4)]
    for name in ("timesteps", "noise", "dropped"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(h, name) for h in halves]))
    other_step = draw_samples(1, 6, torch.arange(8), (4, 2, 2), 1000, 0.5)
    assert not torch.equal(whole.noise, other_step.noise)


def test_dropped_samples_get_the_negative_input(unet):
    training, denoiser = make_training(unet("sd15"), id_dropout=0.5)
    batch = pair_batch(size=4)
    step = next(s for s in range(100) if len(set(training.draw(batch, s).dropped.tolist())) == 2)
    dropped = training.draw(batch, step).dropped
    inputs = []
    encode = training.encoder.encode

    def recording(faces, clip=None, **kwargs):
        inputs.append((faces, clip))
        return encode(faces, clip, **kwargs)

    training.encoder.encode = recording
    with denoiser, torch.no_grad():
        training(batch, step)
    (faces, clip), = inputs
    assert torch.equal(faces[dropped], torch.zeros_like(faces[dropped]))
    assert torch.equal(clip[dropped], clip_uncond().expand(int(dropped.sum()), -1, -1))
    assert torch.equal(faces[~dropped], batch.reference_faces[~dropped])
    assert torch.equal(clip[~dropped], batch.reference_clip[~dropped])


def test_a_batch_split_over_processes_gives_the_loss_of_the_whole_batch(unet):
    training, denoiser = make_training(unet("sd15"), id_dropout=0.5)
    batch = pair_batch(size=4)
    halves = [replace(batch, **{n: getattr(batch, n)[rows] for n in ("sample_ids", "reference_faces",
                                                                      "reference_clip", "target_latents")})
              for rows in (slice(0, 2), slice(2, 4))]
    with denoiser, torch.no_grad():
        whole = training(batch, 4)
        split = sum(training(half, 4) for half in halves) / 2
    assert torch.allclose(whole, split, rtol=1e-5)


# --- EMA -----------------------------------------------------------------------------------------

def test_ema_follows_its_formula_and_resumes():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    module[1].requires_grad_(False)  # not trained: not averaged
    decay = 0.9
    ema = EncoderEMA(module, decay)
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    w0 = module[0].weight.detach().clone()
    weights = [torch.randn(2, 3), torch.randn(2, 3)]
    for w in weights:
        module[0].weight.data.copy_(w)
        ema.update(module)
    expected = decay ** 2 * w0 + decay * (1 - decay) * weights[0] + (1 - decay) * weights[1]
    assert torch.allclose(ema.shadow["0.weight"], expected) and ema.updates == 2
    resumed = EncoderEMA(module, decay)
    resumed.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert torch.equal(resumed.shadow["0.weight"], ema.shadow["0.weight"]) and resumed.updates == 2
    resumed.copy_to(module)
    assert torch.allclose(module[0].weight, expected)
    with pytest.raises(TrainingError, match="ema_decay"):
        EncoderEMA(module, 0.99).load_state_dict(ema.state_dict())
    module[1].requires_grad_(True)
    with pytest.raises(TrainingError, match="other weights"):
        EncoderEMA(module, decay).load_state_dict(ema.state_dict())
    with pytest.raises(TrainingError):
        EncoderEMA(module, 0.0)


# --- precision, checkpointing, the frozen model --------------------------------------------------

def test_bf16_autocast_trains_with_finite_gradients(unet):
    training, denoiser = make_training(unet("sd15"), mixed_precision="bf16", id_dropout=0.0)
    with denoiser:
        loss = training(pair_batch(), 0)
        loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in training.trainable_parameters())


def test_gradient_checkpointing_gives_the_same_step_and_leaves_the_model_as_it_was(unet):
    model = unet("sd15")
    unet_module = model.model.diffusion_model
    weights = {name: t.clone() for name, t in model.model.state_dict().items()}
    options = copy.deepcopy(model.model_options)
    flags = [p.requires_grad for p in model.model.parameters()]
    batch = pair_batch()
    grads = []
    for checkpointing in (False, True):
        training, denoiser = make_training(model, gradient_checkpointing=checkpointing)
        optimizer = torch.optim.AdamW(training.trainable_parameters(), lr=1e-3)
        with denoiser:
            for step in range(2):
                optimizer.zero_grad()
                loss = training(batch, step)
                loss.backward()
                grads.append(torch.cat([p.grad.flatten() for p in training.trainable_parameters()]))
                optimizer.step()
    assert torch.allclose(grads[0], grads[2], atol=1e-6) and torch.allclose(grads[1], grads[3], atol=1e-6)
    state = model.model.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[n], w) for n, w in weights.items())
    assert model.model_options == options  # no patch left on the MODEL given
    assert [p.requires_grad for p in model.model.parameters()] == flags
    assert all(not m._forward_pre_hooks and "forward" not in m.__dict__ for m in unet_module.modules())


def test_the_denoiser_refuses_to_run_outside_its_context(unet):
    training, _denoiser = make_training(unet("sd15"))
    with pytest.raises(TrainingError, match="with denoiser"):
        training(pair_batch(), 0)


def test_an_encoder_with_a_clip_mapper_needs_the_unconditional_clip_features(unet):
    settings = EncoderTrainingSettings()
    denoiser = training_denoiser(unet("sd15"), settings)
    with pytest.raises(TrainingError, match="clip_uncond"):
        EncoderTraining(small_encoder(denoiser), denoiser, settings, None)


# --- settings ------------------------------------------------------------------------------------

def test_settings_defaults_ranges_and_round_trip():
    s = ENCODER_DEFAULTS
    assert (s.learning_rate, s.weight_decay, s.text_attention) == (1e-4, 0.01, "off")  # the paper's recipe
    assert (s.min_snr_gamma, s.ema_decay, s.mixed_precision, s.id_dropout) == (0.0, 0.0, "no", 0.05)
    assert encoder_setting_range("id_dropout") == {"min": 0.0, "max": 1.0}
    changed = EncoderTrainingSettings(text_attention="on", ema_decay=0.999, steps=10)
    assert EncoderTrainingSettings.from_dict(changed.to_dict()) == changed
    assert EncoderTrainingSettings.from_dict({"seed": 3}).seed == 3
    assert changed.step_differences(s) == {"text_attention": ("on", "off"), "ema_decay": (0.999, 0.0)}
    assert "steps" not in STEP_SETTINGS  # a resumed run may be given more steps
    with pytest.raises(TrainingSettingsError, match="unknown_setting"):
        EncoderTrainingSettings.from_dict({"unknown_setting": 1})
    with pytest.raises(TrainingSettingsError, match="text_attention"):
        EncoderTrainingSettings(text_attention="sometimes")
    with pytest.raises(TrainingSettingsError, match="id_dropout"):
        EncoderTrainingSettings(id_dropout=1.5)


# --- ComfyUI's loader and VAE --------------------------------------------------------------------

def test_encode_crops_is_vae_encode_and_scales_for_the_model(unet):
    from factories import tiny_vae

    vae = tiny_vae()
    crops = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    torch.manual_seed(0)  # ComfyUI's VAE samples its latent distribution, as training encoders do
    latents = encode_crops(vae, crops)
    assert latents.shape == (2, 4, 8, 8) and not latents.requires_grad
    torch.manual_seed(0)
    assert torch.allclose(latents, vae.encode(crops.float() / 255.0).float())
    denoiser = training_denoiser(unet("sd15"), EncoderTrainingSettings())
    torch.manual_seed(0)
    assert torch.allclose(encode_crops(vae, crops, denoiser.process_latent_in), latents * 0.18215)
    with pytest.raises(TrainingError, match="uint8"):
        encode_crops(vae, crops.float())
    with pytest.raises(TrainingError, match="multiples of 8"):
        encode_crops(vae, crops[:, :60])


def test_checkpoint_models_names_a_missing_file(tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        checkpoint_models(str(tmp_path / "missing.safetensors"))
