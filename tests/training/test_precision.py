"""The trainer's precision follows what the UNet computes in: loss scaling whenever float16 is computed
(float16 autocast, float16 weights, a float16 manual cast, also under bfloat16 autocast, because
apply_model casts the context to the UNet's dtype), bfloat16 compute where ComfyUI can cast float16
weights per layer; and the token vectors' gradients of a float16 model match a float32 run."""

from __future__ import annotations

import comfy.model_patcher
import pytest
import torch
from factories import make_clip, make_model, tiny_vae
from torch.utils._python_dispatch import TorchDispatchMode
from trainer_inputs import face_photos, train_node

from comfyui_idfuse.models.training import token_trainer
from comfyui_idfuse.models.training.token_trainer import IdentityTrainer
from comfyui_idfuse.nodes.glue import training_models
from comfyui_idfuse.nodes.glue.training_models import Precision, model_compute_dtype, training_precision

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CPU = torch.device("cpu")
# set_model_compute_dtype: newer ComfyUI (0.3.x, 0.8) casts the weights to another compute dtype per layer
CAN_SET_COMPUTE = hasattr(comfy.model_patcher.ModelPatcher, "set_model_compute_dtype")

# Measured on the tiny SD1.5 UNet (first step, attention loss off), float16 weights against float32
# weights trained in float32: float16 compute with loss scaling cosine >= 0.99998, relative norm error
# <= 0.17% (late-2024 core and 0.8); bfloat16 compute (0.8, 8-bit mantissa) cosine >= 0.9996, norm
# error <= 0.8%. Without loss scaling (at the real-weights loss size below) every gradient is zero.
TOLERANCE = {FP16: {"cosine": 0.9999, "norm": 0.01}, BF16: {"cosine": 0.998, "norm": 0.03}}


def _model(weights: torch.dtype, manual_cast: torch.dtype | None = None):
    model = make_model("sd15", dtype=weights).clone()
    if manual_cast is not None:  # what ComfyUI's loader sets for weights the GPU cannot compute in (bf16, fp8)
        model.add_object_patch("manual_cast_dtype", manual_cast)
    return model


# (weights, manual cast, training_dtype, bfloat16 GPU) -> (autocast, loss scaling, compute dtype), newer ComfyUI
# first, then where the late-2024 core differs (it cannot change a model's compute dtype).
CASES = [
    (FP32, None, "auto", True, (BF16, False, FP32), None),
    (FP32, None, "auto", False, (None, False, FP32), None),
    (FP32, None, "float16", False, (FP16, True, FP32), None),
    (FP32, None, "bfloat16", False, (BF16, False, FP32), None),
    (FP32, None, "float32", True, (None, False, FP32), None),
    # float16 weights: the context is cast to float16 even under bfloat16 autocast
    (FP16, None, "auto", True, (BF16, False, BF16), (None, True, FP16)),
    (FP16, None, "auto", False, (None, True, FP16), None),
    (FP16, None, "float16", True, (FP16, True, FP16), None),
    (FP16, None, "bfloat16", False, (BF16, False, BF16), (BF16, True, FP16)),
    (FP16, None, "float32", True, (None, False, FP32), (None, True, FP16)),
    (BF16, None, "auto", True, (BF16, False, BF16), None),
    (BF16, None, "auto", False, (None, False, BF16), None),
    (BF16, None, "float16", True, (FP16, True, BF16), None),
    # bfloat16 weights computed in float16 (a GPU without bfloat16): the manual-cast dtype decides
    (BF16, FP16, "auto", False, (None, True, FP16), None),
    (BF16, FP16, "auto", True, (BF16, False, BF16), (None, True, FP16)),
]


@pytest.mark.parametrize(("weights", "manual_cast", "name", "bf16_gpu", "newer", "core"), CASES)
def test_precision_follows_what_the_unet_computes_in(weights, manual_cast, name, bf16_gpu, newer, core,
                                                     monkeypatch):
    monkeypatch.setattr(training_models, "bfloat16_available", lambda _device: bf16_gpu)
    model = _model(weights, manual_cast)
    autocast, scaling, compute = newer if CAN_SET_COMPUTE or core is None else core
    assert training_precision(name, model, CPU) == Precision(autocast, scaling)
    assert model_compute_dtype(model) == compute
    # the rule itself: float16 anywhere means loss scaling
    assert scaling == (FP16 in (autocast, compute))


def test_a_compute_dtype_change_stays_on_the_trainers_clone(monkeypatch):
    if not CAN_SET_COMPUTE:
        pytest.skip("this ComfyUI cannot change a model's compute dtype")
    monkeypatch.setattr(training_models, "bfloat16_available", lambda _device: True)
    half = make_model("sd15", dtype=FP16)
    clone = half.clone()
    training_precision("auto", clone, CPU)
    assert clone.object_patches["manual_cast_dtype"] is BF16
    assert "manual_cast_dtype" not in half.object_patches


class ComputedDtypes(TorchDispatchMode):
    """Every floating-point dtype an operation produced (forward and backward) while active."""

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                self.dtypes.add(tensor.dtype)
        return out


class FirstStep:
    """The first training step of a run: its token vectors' gradients (unscaled), the trainer's
    precision, whether the optimiser took the step, and the dtypes computed in it."""

    def __init__(self, monkeypatch, record_dtypes: bool = False):
        self.gradients: dict[str, torch.Tensor] = {}
        self.precision: Precision | None = None
        self.dtypes: set[torch.dtype] | None = None
        self.taken = False
        original = IdentityTrainer.train_step

        def train_step(trainer):
            if self.precision is not None:
                return original(trainer)
            self.precision = Precision(trainer.host.autocast_dtype, trainer.host.loss_scaling)
            handle = trainer.generator.register_forward_hook(self._keep_gradients(trainer))
            mode = ComputedDtypes() if record_dtypes else None
            try:
                if mode is None:
                    losses = original(trainer)
                else:
                    with mode:
                        losses = original(trainer)
            finally:
                handle.remove()
            self.dtypes = None if mode is None else mode.dtypes
            self.taken = trainer.skipped_total == 0
            return losses

        monkeypatch.setattr(IdentityTrainer, "train_step", train_step)

    def _keep_gradients(self, trainer):
        def hook(_module, _args, outputs):
            for kind, vectors in zip(("keys", "values"), outputs, strict=True):
                for name, tensor in vectors.items():
                    if tensor.requires_grad:
                        tensor.register_hook(self._store(trainer, f"{kind}.{name}"))
        return hook

    def _store(self, trainer, key: str):
        def store(grad):
            scale = 1.0 if trainer.scaler is None else trainer.scaler.get_scale()
            self.gradients[key] = grad.detach().double() / scale
        return store


@pytest.fixture(scope="module")
def photos():
    return face_photos(1)


@pytest.fixture(scope="module")
def clip(tokenizer_dir):
    return make_clip("sd15", tokenizer_dir)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


# attention loss off and λ 0: the diffusion loss alone
FIRST_STEP = {"steps": 1, "lora_rank": 0, "attention_mode": "off", "attention_weight": 0.0, "num_stages": 2}
# The tiny UNet's context gradients are ~3e-5 per element, at the bottom of float16's normal range
# (6.1e-5); real SD at 512 px averages its loss over 16x more latent elements through a far larger
# network. The loss is shrunk by 2**-16 (exact in every dtype, and exactly what the initial loss
# scale makes up for) to put them where real weights do: float16 without loss scaling rounds every
# context gradient to zero (measured), with it the run is the unshrunk one.
REAL_WEIGHTS_LOSS_FACTOR = 2.0 ** -16


def _first_step(monkeypatch, weights, clip, vae, photos, save_name, record_dtypes=False, **changes) -> FirstStep:
    step = FirstStep(monkeypatch, record_dtypes)
    loss = token_trainer.diffusion_loss
    monkeypatch.setattr(token_trainer, "diffusion_loss", lambda *a, **k: loss(*a, **k) * REAL_WEIGHTS_LOSS_FACTOR)
    train_node(make_model("sd15", dtype=weights), clip, vae, *photos, save_name, **FIRST_STEP, **changes)
    assert step.gradients, "the step's token vectors got no gradient"
    return step


@pytest.fixture(scope="module")
def float32_gradients(clip, vae, photos):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _first_step(monkeypatch, FP32, clip, vae, photos, "precision_fp32", training_dtype="float32").gradients


def _cosine_and_norm_error(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    return float(cosine), float(abs(got.norm() - expected.norm()) / expected.norm())


# (training_dtype, bfloat16 GPU) of a float16-weight model: its own float16 compute; float16 autocast; a
# bfloat16 GPU (bfloat16 compute where ComfyUI casts weights per layer, else the model's float16). The
# core's bfloat16 autocast over float16 weights cannot run on a CPU: CPU autocast has no float32
# policy for group_norm, which refuses float16 weights on a bfloat16 input (CUDA's runs it in float32).
RUNS = [("auto", False), ("float16", False), ("auto", True)]


@pytest.mark.parametrize(("training_dtype", "bf16_gpu"), RUNS)
def test_token_gradients_of_a_float16_model_match_float32(training_dtype, bf16_gpu, float32_gradients, clip, vae,
                                                          photos, monkeypatch):
    monkeypatch.setattr(training_models, "bfloat16_available", lambda _device: bf16_gpu)
    wants_bf16 = training_dtype == "bfloat16" or bf16_gpu
    step = _first_step(monkeypatch, FP16, clip, vae, photos, f"precision_{training_dtype}_{bf16_gpu}",
                       record_dtypes=True, training_dtype=training_dtype)
    assert step.taken  # the gradients were finite at the loss scale used
    computed_fp16 = FP16 in step.dtypes
    assert step.precision.loss_scaling == computed_fp16  # scaled exactly when float16 was computed
    bfloat16_compute = wants_bf16 and CAN_SET_COMPUTE
    assert computed_fp16 != bfloat16_compute  # float16 weights: float16 compute unless cast to bfloat16
    tolerance = TOLERANCE[BF16 if bfloat16_compute else FP16]
    assert step.gradients.keys() == float32_gradients.keys()
    for key, expected in float32_gradients.items():
        got = step.gradients[key]
        assert bool(got.abs().sum() > 0), f"{key}: every gradient is zero"
        assert torch.equal(got == 0, expected == 0), f"{key}: zeros where float32 has none (underflow)"
        cosine, norm_error = _cosine_and_norm_error(got, expected)
        assert cosine >= tolerance["cosine"] and norm_error <= tolerance["norm"], (key, cosine, norm_error)
