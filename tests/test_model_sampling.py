"""The model-sampling check: each of ComfyUI's ModelSampling variants, built by ComfyUI's own ModelSampling*
nodes, is accepted or refused (with its name and what works) by the token, trainer and Infinite-ID nodes,
and an accepted one still runs."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from factories import make_clip, make_model, random_id_layers, random_stage_contexts, sample, tiny_vae
from trainer_inputs import SIZE, settings

from comfyui_idfuse.models.errors import UnsupportedModelError
from comfyui_idfuse.models.infinite_id.settings import InfiniteIDSettings
from comfyui_idfuse.models.unet import stage_of_timestep
from comfyui_idfuse.nodes.glue.infinite_id import TwoStreamGuider, two_stream_model
from comfyui_idfuse.nodes.glue.model_info import (
    PERCENT_WINDOWS,
    STAGE_TIMESTEPS,
    TRAINING_TIMESTEPS,
    check_model_sampling,
)
from comfyui_idfuse.nodes.tokens import STAGE_CONTEXTS, IDFuseApplyIDTokens
from comfyui_idfuse.nodes.train import IDFuseTrainIdentity


@pytest.fixture(scope="module")
def advanced():
    """ComfyUI's comfy_extras/nodes_model_advanced.py (the ModelSampling* nodes). The pinned core has no
    nodes.py; the module only reads nodes.MAX_RESOLUTION from it, so a stand-in is given for the import."""
    added = "nodes" not in sys.modules
    try:
        import comfy_extras.nodes_model_advanced as module
    except ModuleNotFoundError as e:
        if e.name != "nodes":
            raise
        sys.modules["nodes"] = types.SimpleNamespace(MAX_RESOLUTION=16384)
        import comfy_extras.nodes_model_advanced as module
    else:
        added = False
    yield module
    if added:
        sys.modules.pop("nodes", None)
        sys.modules.pop("comfy_extras.nodes_model_advanced", None)


@pytest.fixture(scope="module")
def sd15():
    return make_model("sd15")


# (id, how the ComfyUI node builds it, words in the description, accepted by tokens / trainer / Infinite-ID)
VARIANTS = [
    ("checkpoint_eps", lambda adv, m: m, "eps prediction on the discrete 1000-step", (True, True, True)),
    ("discrete_eps_zsnr", lambda adv, m: adv.ModelSamplingDiscrete().patch(m, "eps", True)[0],
     "eps prediction on the discrete 1000-step", (True, True, True)),
    ("discrete_v", lambda adv, m: adv.ModelSamplingDiscrete().patch(m, "v_prediction", False)[0],
     "v-prediction on the discrete 1000-step", (True, True, True)),
    ("discrete_v_zsnr", lambda adv, m: adv.ModelSamplingDiscrete().patch(m, "v_prediction", True)[0],
     "v-prediction on the discrete 1000-step", (True, True, True)),
    ("lcm", lambda adv, m: adv.ModelSamplingDiscrete().patch(m, "lcm", False)[0],
     "LCM (distilled, 50 timesteps)", (True, False, True)),
    ("x0", lambda adv, m: adv.ModelSamplingDiscrete().patch(m, "x0", False)[0],
     "x0 prediction on the discrete 1000-step", (True, False, True)),
    ("edm_playground", lambda adv, m: adv.ModelSamplingContinuousEDM().patch(m, "edm_playground_v2.5", 80.0, 0.002)[0],
     "EDM (continuous, e.g. Playground 2.5)", (False, False, True)),
    ("edm_v", lambda adv, m: adv.ModelSamplingContinuousEDM().patch(m, "v_prediction", 120.0, 0.002)[0],
     "v-prediction on a continuous EDM schedule", (False, False, True)),
    ("edm_eps", lambda adv, m: adv.ModelSamplingContinuousEDM().patch(m, "eps", 120.0, 0.002)[0],
     "eps prediction on a continuous EDM schedule", (False, False, True)),
    ("continuous_v", lambda adv, m: adv.ModelSamplingContinuousV().patch(m, "v_prediction", 500.0, 0.03)[0],
     "continuous v-prediction", (False, False, True)),
    ("sd3", lambda adv, m: adv.ModelSamplingSD3().patch(m, 3.0)[0],
     "flow matching / rectified flow (CONST", (False, False, False)),
    ("auraflow", lambda adv, m: adv.ModelSamplingAuraFlow().patch_aura(m, 1.73)[0],
     "flow matching / rectified flow (CONST", (False, False, False)),
    ("flux", lambda adv, m: adv.ModelSamplingFlux().patch(m, 1.15, 0.5, 1024, 1024)[0],
     "flow matching / rectified flow (CONST", (False, False, False)),
    ("stable_cascade", lambda adv, m: adv.ModelSamplingStableCascade().patch(m, 2.0)[0],
     "Stable Cascade", (False, False, False)),
]
NEEDS = {"IDFuse Apply ID Tokens": STAGE_TIMESTEPS, "IDFuse Train Identity": TRAINING_TIMESTEPS,
         "IDFuse Infinite-ID Guider / Sampler": PERCENT_WINDOWS}


@pytest.mark.parametrize(("build", "words", "accepted"), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_each_comfy_sampling_is_accepted_or_refused_by_name(advanced, sd15, build, words, accepted):
    model = build(advanced, sd15)
    for (node, needs), ok in zip(NEEDS.items(), accepted, strict=True):
        if ok:
            assert words in check_model_sampling(model, node, needs).describe()
        else:
            with pytest.raises(UnsupportedModelError) as refused:
                check_model_sampling(model, node, needs)
            message = str(refused.value)
            assert message.startswith(f"{node} cannot use this model: its sampling is ")
            assert words in message and "Supported: " in message


def test_img_to_img_where_comfy_has_it(advanced, sd15):
    choices = advanced.ModelSamplingDiscrete.INPUT_TYPES()["required"]["sampling"][0]
    if "img_to_img" not in choices:
        pytest.skip("this ComfyUI has no img_to_img sampling")
    model = advanced.ModelSamplingDiscrete().patch(sd15, "img_to_img", False)[0]
    assert "image-to-image x0" in check_model_sampling(model, "n", STAGE_TIMESTEPS).describe()
    with pytest.raises(UnsupportedModelError, match="image-to-image x0"):
        check_model_sampling(model, "n", TRAINING_TIMESTEPS)


def test_an_unknown_sampling_class_is_refused_by_its_name(sd15):
    import comfy.model_sampling

    class OwnSchedule(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        def timestep(self, sigma):  # a custom map from sigma to timestep: not the 1000-step one
            return sigma

    model = sd15.clone()
    model.add_object_patch("model_sampling", OwnSchedule(sd15.model.model_config))
    with pytest.raises(UnsupportedModelError, match=r"an unrecognised sampling \(OwnSchedule\)"):
        check_model_sampling(model, "IDFuse Apply ID Tokens", STAGE_TIMESTEPS)


def _id_conditioning(contexts):
    return [[contexts.plain, {STAGE_CONTEXTS: contexts}]]


def test_apply_id_tokens_refuses_edm_and_runs_lcm_on_the_training_stages(advanced, sd15):
    contexts = random_stage_contexts()
    positive, negative = _id_conditioning(contexts), [[torch.randn(1, 77, 768), {}]]
    edm = advanced.ModelSamplingContinuousEDM().patch(sd15, "edm_playground_v2.5", 80.0, 0.002)[0]
    with pytest.raises(UnsupportedModelError, match=r"IDFuse Apply ID Tokens .* EDM \(continuous"):
        IDFuseApplyIDTokens().apply(edm, positive, 1.0, 0.0, 1.0)

    lcm = advanced.ModelSamplingDiscrete().patch(sd15, "lcm", False)[0]
    (patched,) = IDFuseApplyIDTokens().apply(lcm, positive, 1.0, 0.0, 1.0)
    seen = []
    patched.set_model_attn2_patch(lambda n, c, v, eo: (seen.append((c, eo["sigmas"])), (n, c, v))[1])
    out = sample(patched, positive, negative, steps=4)
    assert torch.isfinite(out).all()
    # Each LCM step uses the stage of the 1000-step training timestep at its sigma (the plain schedule's).
    training_schedule = sd15.get_model_object("model_sampling")
    stages_used = set()
    for keys_context, sigmas in seen:
        stage = int(stage_of_timestep(training_schedule.timestep(sigmas[:1].float()), contexts.num_stages))
        assert any(torch.equal(row, contexts.keys[stage]) for row in keys_context)
        stages_used.add(stage)
    assert len(stages_used) > 1


def _small_trainer_inputs(tokenizer_dir):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(1, SIZE, SIZE, 3, generator=gen)
    masks = torch.zeros(1, SIZE, SIZE)
    masks[:, 32:96, 32:96] = 1.0
    return make_clip("sd15", tokenizer_dir), tiny_vae(), images, masks


@pytest.fixture
def output_folders(tmp_path):
    import folder_paths

    from comfyui_idfuse.nodes.glue.folders import ID_TOKENS_FOLDER

    saved = dict(folder_paths.folder_names_and_paths)
    folder_paths.folder_names_and_paths[ID_TOKENS_FOLDER] = ([str(tmp_path / "tokens")], {".safetensors"})
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path / "loras")], {".safetensors"})
    yield tmp_path
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)


def test_trainer_refuses_lcm_before_any_work_and_trains_on_zsnr_v(advanced, sd15, tokenizer_dir, output_folders):
    clip, vae, images, masks = _small_trainer_inputs(tokenizer_dir)
    lcm = advanced.ModelSamplingDiscrete().patch(sd15, "lcm", False)[0]
    kwargs = settings(save_name="sampling_lcm", steps=1, lora_rank=0, num_stages=2)
    with torch.inference_mode(), pytest.raises(UnsupportedModelError, match=r"IDFuse Train Identity .* LCM"):
        IDFuseTrainIdentity().train(lcm, clip, vae, images, masks=masks, **kwargs)
    assert not any(output_folders.rglob("*.safetensors"))

    zsnr_v = advanced.ModelSamplingDiscrete().patch(sd15, "v_prediction", True)[0]
    kwargs = settings(save_name="sampling_zsnr_v", steps=1, lora_rank=0, num_stages=2)
    with torch.inference_mode():
        tokens = IDFuseTrainIdentity().train(zsnr_v, clip, vae, images, masks=masks, **kwargs)[0]
    assert all(torch.isfinite(v).all() for v in tokens.keys.values())


def _two_streams(model, settings_):
    import comfy.samplers

    cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5))
    patched = two_stream_model(model, random_id_layers(model, "sd15"), settings_)
    guider = TwoStreamGuider(patched)
    guider.set_conds([[cond, {}]], [[cond.flip(1), {}]])
    guider.set_cfg(5.0)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 3)
    with torch.inference_mode():
        return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0)


def test_infinite_id_refuses_flow_and_runs_edm(advanced, sd15):
    on = InfiniteIDSettings(id_weight=1.0, mixing=True, id_start=0.2, id_end=0.8)
    flow = advanced.ModelSamplingSD3().patch(sd15, 3.0)[0]
    with pytest.raises(UnsupportedModelError, match=r"Infinite-ID .* flow matching / rectified flow"):
        two_stream_model(flow, random_id_layers(sd15, "sd15"), on)
    edm = advanced.ModelSamplingContinuousEDM().patch(sd15, "edm_playground_v2.5", 80.0, 0.002)[0]
    ident = _two_streams(edm, on)
    assert torch.isfinite(ident).all()
    assert not torch.equal(ident, _two_streams(edm, InfiniteIDSettings(id_weight=0.0, mixing=False)))
