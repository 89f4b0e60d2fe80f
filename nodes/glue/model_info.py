"""What a ComfyUI MODEL or CLIP is, in the pack's terms: its family (block table), layer widths, sampling."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ...models.errors import UnsupportedModelError
from ...models.unet import NUM_TRAIN_TIMESTEPS, block_keys, cross_attention_path, family_from_context_dim

log = logging.getLogger("idfuse.nodes")


def model_family(model) -> str:
    """'sd15' or 'sdxl' for a ModelPatcher, from its UNet's cross-attention width."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    return family_from_context_dim(config.get("context_dim"))


# ComfyUI tokenizer keys of each family's text encoders, and the names the pack uses for them.
TOKENIZER_KEYS = {"sd15": {"l": "clip_l"}, "sdxl": {"l": "clip_l", "g": "clip_g"}}


def clip_family(tokens: dict) -> str:
    keys = set(tokens)
    for family, names in TOKENIZER_KEYS.items():
        if keys == set(names):
            return family
    raise UnsupportedModelError(
        f"This CLIP has text encoders {sorted(keys)}; IDFuse supports the SD1.5 (clip_l) and SDXL "
        f"(clip_l + clip_g) text encoders. Load the CLIP of an SD1.5 or SDXL checkpoint.")


def cross_attention_widths(model) -> dict[tuple[str, int, int], int]:
    """Inner width of each cross-attention layer of a ComfyUI UNet, by block key."""
    unet = model.model.diffusion_model
    return {key.key: unet.get_submodule(cross_attention_path(unet, key)).to_k.out_features
            for key in block_keys(model_family(model))}


# --- the model's sampling (its noise schedule and parameterisation) ---

# ComfyUI builds a model's sampling object by mixing a schedule class (how sigmas and timesteps map) with a
# prediction class (what the UNet outputs). Some of these classes live in comfy_extras, or moved between
# versions, so they are recognised by the name of the class whose method the object uses, not imported.
_SCHEDULES = {  # class defining timestep() -> schedule
    "ModelSamplingDiscrete": "discrete",
    "ModelSamplingDiscreteDistilled": "lcm",
    "ModelSamplingDiscreteEDM": "discrete_edm",
    "ModelSamplingContinuousEDM": "continuous_edm",
    "ModelSamplingContinuousV": "continuous_v",
    "ModelSamplingDiscreteFlow": "flow",
    "ModelSamplingFlux": "flow",
    "StableCascadeSampling": "stable_cascade",
    "ModelSamplingCosmosRFlow": "cosmos",
}
_PREDICTIONS = {  # class defining calculate_denoised() -> prediction
    "EPS": "eps", "V_PREDICTION": "v", "EDM": "edm", "X0": "x0", "LCM": "lcm", "CONST": "const",
    "COSMOS_RFLOW": "rectified_flow",
}
_PREDICTION_WORDS = {"eps": "eps prediction", "v": "v-prediction", "x0": "x0 prediction",
                     "img_to_img": "image-to-image x0 prediction", "lcm": "LCM", "edm": "EDM",
                     "const": "flow (CONST)", "rectified_flow": "rectified flow"}


def _defining_class(obj, method: str) -> type | None:
    return next((cls for cls in type(obj).__mro__ if method in vars(cls)), None)


@dataclass(frozen=True)
class SamplingKind:
    """A model's sampling in the pack's terms: ``schedule`` and ``prediction`` keys (None when ComfyUI's
    classes are not recognised), the number of discrete training timesteps and the class, for the words."""

    schedule: str | None
    prediction: str | None
    timesteps: int | None
    zero_terminal_snr: bool
    class_name: str
    sampling_steps: int | None = None  # the LCM's own timesteps

    def describe(self) -> str:
        prediction = _PREDICTION_WORDS.get(self.prediction or "", "an unrecognised prediction")
        if self.schedule == "discrete":
            snr = " with zero terminal SNR" if self.zero_terminal_snr else ""
            return f"{prediction} on the discrete {self.timesteps}-step schedule{snr}"
        if self.schedule == "lcm":
            return f"LCM (distilled, {self.sampling_steps} timesteps)"
        if self.schedule == "continuous_edm":
            return {"edm": "EDM (continuous, e.g. Playground 2.5)",
                    "v": "v-prediction on a continuous EDM schedule (e.g. CosXL)"}.get(
                self.prediction, f"{prediction} on a continuous EDM schedule (ModelSamplingContinuousEDM)")
        return {
            "continuous_v": "continuous v-prediction (ModelSamplingContinuousV)",
            "flow": "flow matching / rectified flow (CONST, as ModelSamplingSD3, ModelSamplingAuraFlow or "
                    "ModelSamplingFlux set it)",
            "stable_cascade": "Stable Cascade's continuous schedule",
            "cosmos": "Cosmos rectified flow",
            "discrete_edm": "EDM timesteps on a discrete schedule (ModelSamplingDiscreteEDM)",
        }.get(self.schedule, f"an unrecognised sampling ({self.class_name})")


def sampling_kind(model) -> SamplingKind:
    """What the MODEL's sampling object (with every ModelSampling patch applied) is."""
    sampling = model.get_model_object("model_sampling")
    schedule_class = _defining_class(sampling, "timestep")
    prediction_class = _defining_class(sampling, "calculate_denoised")
    input_class = _defining_class(sampling, "calculate_input")
    schedule = _SCHEDULES.get(getattr(schedule_class, "__name__", ""))
    if _defining_class(sampling, "sigma") is not _defining_class(sampling, "timestep"):
        schedule = None  # a subclass that changes one direction of the sigma <-> timestep map is not the known one
    prediction = _PREDICTIONS.get(getattr(prediction_class, "__name__", ""))
    if getattr(input_class, "__name__", "") == "IMG_TO_IMG":
        prediction = "img_to_img"
    sigmas = getattr(sampling, "sigmas", None)
    steps = None if sigmas is None else int(sigmas.shape[0])
    timesteps = steps
    if schedule == "lcm":
        timesteps = int(getattr(sampling, "num_timesteps", 0)) or None
    return SamplingKind(schedule=schedule, prediction=prediction, timesteps=timesteps,
                        zero_terminal_snr=bool(getattr(sampling, "zsnr", False)),
                        class_name=type(sampling).__name__, sampling_steps=steps)


@dataclass(frozen=True)
class SamplingNeeds:
    """What a node needs of the model's sampling: schedules (and predictions, None = any) it supports,
    why, and the supported ones in words for the error."""

    reason: str
    schedules: frozenset[str]
    works: str
    predictions: frozenset[str] | None = None
    timesteps: int | None = NUM_TRAIN_TIMESTEPS  # the discrete schedules' training timesteps

    def accepts(self, kind: SamplingKind) -> bool:
        if kind.schedule not in self.schedules:
            return False
        if self.predictions is not None and kind.prediction not in self.predictions:
            return False
        discrete = kind.schedule in ("discrete", "lcm")
        return not (discrete and self.timesteps is not None and kind.timesteps != self.timesteps)


_DISCRETE_WORDS = "ComfyUI's discrete 1000-step schedule (any beta schedule, zero terminal SNR included)"

# Apply ID Tokens: the stage of a step is its timestep on the training schedule (models.unet.stage_of_timestep).
# LCM's timestep() gives each of its 50 sigmas the 1000-step timestep it was distilled at, so stages fit.
STAGE_TIMESTEPS = SamplingNeeds(
    reason="the identity's stages are picked by the step's timestep on the 1000-step training schedule",
    schedules=frozenset({"discrete", "lcm"}),
    works=f"eps, v-prediction or x0 on {_DISCRETE_WORDS}, and LCM (ModelSamplingDiscrete with lcm)")
# Train Identity: draws 1 of the 1000 timesteps per sample and takes the eps/v diffusion loss.
TRAINING_TIMESTEPS = SamplingNeeds(
    reason="the trainer draws the 1000 discrete training timesteps and takes the eps or v diffusion loss",
    schedules=frozenset({"discrete"}), predictions=frozenset({"eps", "v"}),
    works=f"eps or v-prediction on {_DISCRETE_WORDS}, the sampling SD1.5 and SDXL checkpoints load with "
          f"(train on the model without an lcm/x0 sampling patch, then use the tokens with it)")
# Infinite-ID: start/end percents go through the model's own percent_to_sigma, so any diffusion schedule of an
# SD1.5/SDXL UNet fits; flow and other families' schedules on such a UNet are a mis-wired ModelSampling node.
PERCENT_WINDOWS = SamplingNeeds(
    reason="Infinite-ID runs SD1.5/SDXL diffusion models (its start/end percents become sigmas through the "
           "model's schedule)",
    schedules=frozenset({"discrete", "lcm", "continuous_edm", "continuous_v"}), timesteps=None,
    works=f"any prediction on {_DISCRETE_WORDS}, LCM, EDM (continuous, e.g. Playground 2.5), v-prediction on a "
          f"continuous EDM schedule (e.g. CosXL) and ModelSamplingContinuousV")


def check_model_sampling(model, node: str, needs: SamplingNeeds) -> SamplingKind:
    """The model's sampling if ``node`` can use it, else UnsupportedModelError naming it and what works."""
    kind = sampling_kind(model)
    if not needs.accepts(kind):
        raise UnsupportedModelError(
            f"{node} cannot use this model: its sampling is {kind.describe()}, and {needs.reason}. "
            f"Supported: {needs.works}. Connect the model without the ModelSampling node that set this "
            f"sampling, or a checkpoint whose own sampling is one of these.")
    log.debug("%s: model sampling %s", node, kind.describe())
    return kind
