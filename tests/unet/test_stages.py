"""sigma -> timestep -> stage, against the 1000-step buckets, for eps and v prediction."""

from __future__ import annotations

import pytest
import torch
from factories import make_model, random_stage_contexts, sample

from comfyui_idfuse.models.unet import stage_of_timestep
from comfyui_idfuse.nodes.tokens import IDFuseApplyIDTokens


def test_stage_buckets():
    t = torch.arange(1000)
    for stages in (1, 3, 5, 7):
        expected = torch.tensor([i * stages // 1000 for i in range(1000)])
        assert torch.equal(stage_of_timestep(t, stages), expected)
    assert stage_of_timestep(999.9, 5) == 4 and stage_of_timestep(-1.0, 5) == 0


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sigma_to_stage_through_model_sampling(prediction):
    sampling = make_model("sd15", prediction=prediction).get_model_object("model_sampling")
    for t in range(0, 1000, 7):
        sigma = sampling.sigmas[t]
        assert int(stage_of_timestep(sampling.timestep(sigma), 5)) == t // 200


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_stage_switches_exactly_at_boundaries_while_sampling(prediction):
    """Sample through sigmas on both sides of every boundary; the K context seen must follow."""
    model = make_model("sd15", prediction=prediction)
    contexts = random_stage_contexts("sd15", num_stages=5)
    positive = [[contexts.plain, {"idfuse_stage_contexts": contexts}]]
    negative = [[torch.zeros_like(contexts.plain), {}]]
    (patched,) = IDFuseApplyIDTokens().apply(model, positive, 1.0, 0.0, 1.0)
    seen = []

    def observe(n, context, value, extra_options):
        if extra_options["block"] == ("input", 1):  # once per model call
            row = extra_options["cond_or_uncond"].index(0)
            stage = [s for s in range(5) if torch.equal(context[row], contexts.keys[s])]
            seen.append(stage)
        return n, context, value

    patched.set_model_attn2_patch(observe)
    sampling = model.get_model_object("model_sampling")
    timesteps = [999, 800, 799, 600, 599, 400, 399, 200, 199, 0]
    sigmas = torch.cat([sampling.sigmas[timesteps].float(), torch.zeros(1)])
    sample(patched, positive, negative, sigmas=sigmas)
    assert seen == [[t // 200] for t in timesteps]
