"""Training an identity (SeFi-IDE tokens, optional LoRA) against a frozen diffusion model. Plain torch.

The host (ComfyUI glue in nodes/trainer.py) provides the frozen model as callables: ``encode``
(a prompt template with word vectors spliced in -> context), ``denoise`` (noisy latent, sigma,
keys context, values context -> predicted x0, in the model's own parameterisation) and its
``model_sampling``. This module owns what training means: sampling, the stage of each sample,
the losses, the optimiser, evaluation, and the state needed to resume exactly.

Every random draw of step k comes from a generator seeded with (seed, k), so a run resumed at
step k repeats exactly what an uninterrupted run would have done from there.
"""

from __future__ import annotations

import json
import logging
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .attention_loss import (
    MASK_MODES,
    REFERENCE_MODES,
    AttentionProbes,
    ProbeBatch,
    attention_loss,
    attention_maps,
    face_share,
)
from .generator import IDTokenGenerator
from .stages import stage_of_timestep

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = (
    "a photo of the face of {}",
    "a close-up photo of the face of {}",
    "a cropped photo of the face of {}",
    "a good photo of the face of {}",
)
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
TRAINING_DTYPES = ("auto", "float32", "bfloat16")
AUGMENTATIONS = ("flip", "flip + crop/scale", "crop/scale", "none")


@dataclass(frozen=True)
class TrainingSettings:
    placeholder: str
    initializer: str = "person"
    num_stages: int = 5
    steps: int = 600
    learning_rate: float = 1e-4
    attention_weight: float = 0.003
    attention_mode: str = "face_mask"
    loss_downscales: tuple[int, ...] = (2, 4)
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ("to_k", "to_v")
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    augmentation: str = "flip"
    resolution: int = 512
    batch_size: int = 1
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    training_dtype: str = "auto"
    seed: int = 0
    checkpoint_every: int = 100
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_snr_gamma: float = 0.0
    detach_reference: bool = True
    generator_width: int = 256

    def to_dict(self) -> dict:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class NonFiniteLossError(TrainingError):
    def __init__(self, step: int, what: str, values: dict[str, float]):
        self.step = step
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        super().__init__(f"Training step {step}: the {what} is not finite ({shown}). Training stopped; "
                         f"lower the learning rate or λ, or use training_dtype float32.")


@dataclass
class TrainingData:
    """Encoded photos. Variants are the photos and their augmented copies, all the same size."""

    latents: torch.Tensor  # (V, C, h, w), already scaled for the model (process_latent_in)
    masks: torch.Tensor | None  # (V, h, w) face masks at latent resolution, 1 = face
    originals: torch.Tensor  # (P,) variant index of each photo as given (for evaluation)

    @property
    def num_variants(self) -> int:
        return self.latents.shape[0]


@dataclass
class PromptTable:
    """Per prompt template: where the placeholder is, and for reference_prompt the reference encoding."""

    placeholder_positions: torch.Tensor  # (T,)
    reference_contexts: torch.Tensor | None = None  # (T, L, C) keys context of the initialiser's prompt
    reference_positions: torch.Tensor | None = None  # (T,)

    @property
    def num_templates(self) -> int:
        return self.placeholder_positions.shape[0]


@dataclass
class Host:
    """The frozen model, as the trainer sees it."""

    encode: Callable[[int, dict[str, torch.Tensor]], torch.Tensor]  # template, vectors -> (1, L, C)
    denoise: Callable[..., torch.Tensor]  # (x, sigma, keys_ctx, values_ctx, templates) -> x0
    model_sampling: nn.Module
    device: torch.device
    check_interrupt: Callable[[], None] = lambda: None
    autocast_dtype: torch.dtype | None = None


@dataclass
class StepLosses:
    step: int
    diffusion: float
    attention: float
    total: float
    learning_rate: float


@dataclass
class Evaluation:
    maps: torch.Tensor  # (P, h, w) the placeholder's attention per photo (latent grid)
    share: torch.Tensor | None  # (P,) share of it inside the face mask
    diffusion_loss: float


@dataclass
class LossHistory:
    steps: list[StepLosses] = field(default_factory=list)

    def to_tensor(self) -> torch.Tensor:
        rows = [[s.step, s.diffusion, s.attention, s.total, s.learning_rate] for s in self.steps]
        return torch.tensor(rows, dtype=torch.float64).reshape(-1, 5)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> LossHistory:
        return cls([StepLosses(int(r[0]), *(float(v) for v in r[1:])) for r in tensor.tolist()])


def diffusion_loss(model_sampling, sigma: torch.Tensor, x0_pred: torch.Tensor, x0: torch.Tensor,
                   snr_weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE in the model's own parameterisation (eps, v, ...), from its predicted x0.

    ComfyUI's denoised x0 is ``offset(x) + gain(sigma) * raw_output``; the raw target is the output
    that gives the true x0, so raw error = (x0_pred - x0) / gain, whatever the parameterisation.
    ``snr_weight`` (Min-SNR) weights the x0 error directly: that is min(snr, γ)/snr for eps and
    min(snr, γ)/(snr + 1) for v, expressed once.
    """
    gain = model_sampling.calculate_denoised(sigma, torch.ones_like(x0_pred), torch.zeros_like(x0_pred))
    error = (x0_pred.float() - x0.float()) ** 2
    if snr_weight is None:
        return (error / gain.float() ** 2).mean()
    return (error * snr_weight.view(-1, 1, 1, 1)).mean()


def min_snr_weight(model_sampling, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, γ) per sample, the SNR from diffusers' compute_snr on the model's own noise schedule."""
    try:
        from diffusers.training_utils import compute_snr
    except ImportError as e:
        raise TrainingError("min_snr_gamma > 0 needs the diffusers package (pip install diffusers); "
                            "or set min_snr_gamma to 0.") from e
    sigmas = model_sampling.sigmas.detach().float().cpu()
    schedule = types.SimpleNamespace(alphas_cumprod=1.0 / (1.0 + sigmas ** 2))
    snr = compute_snr(schedule, timesteps.cpu())
    return snr.clamp(max=gamma)


def make_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    if name == "constant" and warmup_steps == 0:
        return None
    if name not in LR_SCHEDULES:
        raise TrainingError(f"Unknown lr_schedule '{name}'; use one of {', '.join(LR_SCHEDULES)}.")
    try:
        from diffusers.optimization import get_scheduler
    except ImportError as e:
        raise TrainingError(f"lr_schedule '{name}' needs the diffusers package (pip install diffusers); "
                            f"or use lr_schedule constant with warmup_steps 0.") from e
    if name == "constant":
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """The random source of one micro-batch: depends only on (seed, step, micro)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2 ** 63))


class IdentityTrainer:
    def __init__(self, settings: TrainingSettings, host: Host, data: TrainingData, prompts: PromptTable,
                 probes: AttentionProbes, generator: IDTokenGenerator, adapters: nn.ModuleDict | None = None):
        self.settings = settings
        self.host = host
        self.data = data
        self.prompts = prompts
        self.probes = probes
        self.generator = generator
        self.adapters = adapters
        if settings.attention_mode in MASK_MODES and data.masks is None:
            raise TrainingError(f"Attention-loss mode '{settings.attention_mode}' needs face masks.")
        if settings.attention_mode in REFERENCE_MODES and prompts.reference_contexts is None:
            raise TrainingError(f"Attention-loss mode '{settings.attention_mode}' needs the reference prompts.")
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=settings.learning_rate, weight_decay=0.0)
        self.scheduler = make_lr_scheduler(settings.lr_schedule, self.optimizer, settings.warmup_steps,
                                           settings.steps)
        self.step = 0
        self.history = LossHistory()
        sampling = host.model_sampling
        self.num_timesteps = int(sampling.sigmas.shape[0])

    def parameters(self) -> list[nn.Parameter]:
        params = list(self.generator.parameters())
        if self.adapters is not None:
            params += list(self.adapters.parameters())
        return params

    # --- one optimiser step -------------------------------------------------------------------

    def _autocast(self):
        dtype = self.host.autocast_dtype
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.host.device.type, dtype=dtype)

    def _sigmas(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigma of each timestep and its stage, through the model's own sampling object."""
        sampling = self.host.model_sampling
        sigma = sampling.sigma(timesteps.float().to(sampling.sigmas.device))
        stages = stage_of_timestep(sampling.timestep(sigma).cpu(), self.settings.num_stages)
        return sigma.to(self.host.device), stages

    def _contexts(self, templates: torch.Tensor, stages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.generator()
        encode, device = self.host.encode, self.host.device
        keys_ctx = torch.cat([encode(int(t), {n: v[int(s)] for n, v in keys.items()}).to(device)
                              for t, s in zip(templates, stages, strict=True)])
        values_ctx = torch.cat([encode(int(t), {n: v[int(s)] for n, v in values.items()}).to(device)
                                for t, s in zip(templates, stages, strict=True)])
        return keys_ctx, values_ctx

    def _probe_batch(self, templates: torch.Tensor, with_reference: bool) -> ProbeBatch:
        table = self.prompts
        if not with_reference:
            return ProbeBatch(table.placeholder_positions[templates])
        return ProbeBatch(table.placeholder_positions[templates],
                          table.reference_contexts[templates].to(self.host.device),
                          table.reference_positions[templates])

    def _forward(self, variants, templates, timesteps, noise, with_reference: bool):
        """Predicted and true x0 of a batch, with the probes' records of the pass."""
        sigma, stages = self._sigmas(timesteps)
        keys_ctx, values_ctx = self._contexts(templates, stages)
        x0 = self.data.latents[variants].to(self.host.device)
        sampling = self.host.model_sampling
        x_noisy = sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise.to(self.host.device), x0)
        self.probes.begin(self._probe_batch(templates, with_reference))
        with self._autocast():
            x0_pred = self.host.denoise(x_noisy, sigma, keys_ctx, values_ctx, templates.tolist())
        return sigma, x0_pred, x0, self.probes.collected()

    def _micro_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        rng = step_generator(s.seed, step, micro)
        variants = torch.randint(self.data.num_variants, (s.batch_size,), generator=rng)
        templates = torch.randint(self.prompts.num_templates, (s.batch_size,), generator=rng)
        timesteps = torch.randint(0, self.num_timesteps, (s.batch_size,), generator=rng)
        noise = torch.randn((s.batch_size, *self.data.latents.shape[1:]), generator=rng)
        sigma, x0_pred, x0, records = self._forward(variants, templates, timesteps, noise,
                                                    s.attention_mode in REFERENCE_MODES)
        weight = None
        if s.min_snr_gamma > 0:
            weight = min_snr_weight(self.host.model_sampling, timesteps, s.min_snr_gamma).to(x0.device)
        diffusion = diffusion_loss(self.host.model_sampling, sigma, x0_pred, x0, weight)
        masks = None if self.data.masks is None else self.data.masks[variants]
        attention = attention_loss(s.attention_mode, records, masks).to(diffusion.device)
        return diffusion, attention

    def train_step(self) -> StepLosses:
        """One optimiser step (gradient_accumulation micro-batches). Gradients stay readable until the next."""
        s = self.settings
        step = self.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        diffusion_sum = attention_sum = 0.0
        try:
            for micro in range(s.gradient_accumulation):
                diffusion, attention = self._micro_batch(self.step, micro)
                total = diffusion + s.attention_weight * attention
                if not torch.isfinite(total):
                    raise NonFiniteLossError(step, "loss", {"diffusion": float(diffusion.detach()),
                                                            "attention": float(attention.detach())})
                (total / s.gradient_accumulation).backward()
                diffusion_sum += float(diffusion.detach())
                attention_sum += float(attention.detach())
        finally:
            self.probes.end()
        for param in self.parameters():
            if param.grad is not None and not torch.isfinite(param.grad).all():
                raise NonFiniteLossError(step, "gradient", {"diffusion": diffusion_sum, "attention": attention_sum})
        learning_rate = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step = step
        n = s.gradient_accumulation
        losses = StepLosses(step, diffusion_sum / n, attention_sum / n,
                            (diffusion_sum + s.attention_weight * attention_sum) / n, learning_rate)
        self.history.steps.append(losses)
        return losses

    def run(self, on_step: Callable[[StepLosses], None] = lambda _losses: None) -> None:
        """Train up to ``settings.steps``; ``on_step`` runs after each step (progress, checkpoints)."""
        while self.step < self.settings.steps:
            self.host.check_interrupt()
            losses = self.train_step()
            log.info("IDFuse training step %d/%d: diffusion %.5f, attention %.5f, lr %.3g", losses.step,
                     self.settings.steps, losses.diffusion, losses.attention, losses.learning_rate)
            on_step(losses)

    def parameters_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.parameters())

    # --- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, masks: torch.Tensor | None = None, chunk: int = 4) -> Evaluation:
        """The placeholder's attention on each photo (template 0, fixed noise, one timestep at the
        centre of each stage), its share inside the face masks, and the diffusion loss there."""
        s, data = self.settings, self.data
        photos = data.originals
        if masks is None and data.masks is not None:
            masks = data.masks[photos]
        latent_hw = tuple(data.latents.shape[-2:])
        centres = ((torch.arange(s.num_stages) + 0.5) * self.num_timesteps / s.num_stages).long()
        rng = torch.Generator().manual_seed(s.seed + 12_345)
        maps = torch.zeros(len(photos), *latent_hw)
        shares = torch.zeros(len(photos))
        loss_sum = 0.0
        try:
            for timestep in centres:
                noise = torch.randn((len(photos), *data.latents.shape[1:]), generator=rng)
                for start in range(0, len(photos), chunk):
                    rows = slice(start, start + chunk)
                    count = len(photos[rows])
                    templates = torch.zeros(count, dtype=torch.long)
                    sigma, x0_pred, x0, records = self._forward(photos[rows], templates, timestep.repeat(count),
                                                                noise[rows], with_reference=False)
                    loss_sum += float(diffusion_loss(self.host.model_sampling, sigma, x0_pred, x0)) * count
                    maps[rows] += attention_maps(records, latent_hw).cpu()
                    if masks is not None:
                        shares[rows] += face_share(records, masks[rows]).cpu()
        finally:
            self.probes.end()
        n = len(centres)
        return Evaluation(maps / n, None if masks is None else shares / n, loss_sum / (n * len(photos)))

    # --- state for resuming --------------------------------------------------------------------

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Optimiser moments, step and loss history (the trainable weights are saved elsewhere)."""
        state = self.optimizer.state_dict()
        tensors = {f"optimizer.{index}.{name}": torch.as_tensor(value).detach().cpu().clone()
                   for index, entries in state["state"].items() for name, value in entries.items()}
        tensors["history"] = self.history.to_tensor()
        metadata = {"step": str(self.step), "param_groups": json.dumps(state["param_groups"]),
                    "settings": json.dumps(self.settings.to_dict(), sort_keys=True)}
        return tensors, metadata

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        entries: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                entries.setdefault(int(index), {})[name] = value
        groups = json.loads(metadata["param_groups"])
        expected = len(self.parameters())
        if sum(len(g["params"]) for g in groups) != expected:
            raise TrainingError(f"The training state holds optimiser moments for {sum(len(g['params']) for g in groups)} "
                                f"parameters, this trainer has {expected}: the LoRA rank/targets or the generator "
                                f"differ from the run being resumed. Use the same settings, or start a new run.")
        device = self.parameters()[0].device
        state = {i: {k: (v if k == "step" else v.to(device)) for k, v in e.items()} for i, e in entries.items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.step = int(metadata["step"])
        self.history = LossHistory.from_tensor(tensors["history"]) if "history" in tensors else LossHistory()
        if self.scheduler is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": on purpose
                for _ in range(self.step):
                    self.scheduler.step()


# --- making a frozen ComfyUI model trainable through, without changing it --------------------


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """requires_grad off for every parameter of the modules, restored afterwards."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for param, _ in saved:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in saved:
            param.requires_grad_(flag)


@contextmanager
def autograd_safe_residuals(*modules: nn.Module) -> Iterator[None]:
    """Clone the input of every LayerNorm while the context is open.

    The late-2024 core adds residuals in place (``x += attn(norm(x))`` in CLIP and UNet
    transformer blocks); once x needs a gradient, autograd rejects the in-place change of the
    tensor the LayerNorm saved. A clone gives the LayerNorm its own copy. Newer cores add out of
    place; there the clone is only a cheap copy.
    """
    def clone_input(_module, args):
        return (args[0].clone(), *args[1:])

    handles = [m.register_forward_pre_hook(clone_input)
               for root in modules for m in root.modules() if isinstance(m, nn.LayerNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _normal_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor on the same memory as an inference tensor: autograd may save it, and
    nothing is copied (a copy of SD1.5's weights would cost gigabytes). The frozen weights are
    not written during training, so sharing their storage is safe."""
    with torch.inference_mode(False):
        alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


@contextmanager
def without_inference_tensors(*modules: nn.Module) -> Iterator[None]:
    """Swap weights created under torch.inference_mode (ComfyUI loads models there) for normal
    tensors sharing their memory, which autograd may save for the backward pass; the originals
    come back afterwards."""
    swapped: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    try:
        for root in modules:
            for module in root.modules():
                for name, param in list(module._parameters.items()):
                    if param is not None and param.is_inference():
                        swapped.append((module, name, True, param))
                        module._parameters[name] = nn.Parameter(_normal_alias(param), requires_grad=False)
                for name, buffer in list(module._buffers.items()):
                    if buffer is not None and buffer.is_inference():
                        swapped.append((module, name, False, buffer))
                        module._buffers[name] = _normal_alias(buffer)
        if swapped:
            log.info("IDFuse trainer: %d inference-mode tensors aliased so autograd can use them", len(swapped))
        yield
    finally:
        for module, name, is_param, original in reversed(swapped):
            (module._parameters if is_param else module._buffers)[name] = original


@contextmanager
def gradient_checkpointing(diffusion_model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Recompute each UNet layer (ResBlock, spatial transformer) in the backward pass instead of
    keeping its activations. Each call runs on its own copy of the option dicts it was given, so a
    recomputation sees the block name it first saw, not the one the UNet moved on to."""
    if not enabled:
        yield
        return
    targets = [layer for attribute in ("input_blocks", "middle_block", "output_blocks")
               for block in _blocks(getattr(diffusion_model, attribute, None))
               for layer in block if _has_parameters(layer)]

    def wrap(layer: nn.Module):
        original = layer.forward

        def forward(*args, **kwargs):
            frozen_args = [dict(a) if isinstance(a, dict) else a for a in args]
            frozen_kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            first_options: list[dict] = []

            def run():
                call_args = [dict(a) if isinstance(a, dict) else a for a in frozen_args]
                call_kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in frozen_kwargs.items()}
                out = original(*call_args, **call_kwargs)
                if not first_options:
                    first_options.extend(d for d in [*call_args, *call_kwargs.values()] if isinstance(d, dict))
                return out

            out = checkpoint(run, use_reentrant=False)
            # Changes the layer made to the caller's dicts (transformer_index) still reach the caller.
            for given, seen in zip([a for a in [*args, *kwargs.values()] if isinstance(a, dict)], first_options,
                                   strict=False):
                given.update(seen)
            return out
        layer.forward = forward

    try:
        for layer in targets:
            wrap(layer)
        yield
    finally:
        for layer in targets:
            layer.__dict__.pop("forward", None)


def _blocks(container) -> list[nn.Module]:
    if container is None:
        return []
    return [container] if not isinstance(container, nn.ModuleList) else list(container)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


@contextmanager
def training_context(*, unet: nn.Module, text_encoders: nn.Module, checkpointing: bool) -> Iterator[None]:
    """Everything that makes the frozen models usable for training, undone when the context closes."""
    with ExitStack() as stack:
        stack.enter_context(without_inference_tensors(unet, text_encoders))
        stack.enter_context(frozen(unet, text_encoders))
        stack.enter_context(autograd_safe_residuals(unet, text_encoders))
        stack.enter_context(gradient_checkpointing(unet, checkpointing))
        yield


# Key under which the denoiser puts the values context into transformer_options for the patch below.
VALUES_CONTEXT = "idfuse_training_values_context"


class ValuesContextPatch:
    """``attn2_patch``: the cross-attention values come from the V-vector encoding of the prompt
    (``transformer_options[VALUES_CONTEXT]``) while the keys come from the K-vector encoding, which
    is the model's context. Without that option the layer is left alone."""

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        values = extra_options.get(VALUES_CONTEXT)
        if values is None:
            return n, context, value
        return n, context, values.to(context.dtype)


# --- photos, masks and augmentation (ComfyUI layouts: IMAGE (P, H, W, C), MASK (M, H, W)) ------


def training_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """About resolution² pixels with the photo's aspect, sides multiples of 64 (the UNet halves 3 times
    after the VAE's factor 8)."""
    scale = resolution / (height * width) ** 0.5
    return (max(64, round(height * scale / 64) * 64), max(64, round(width * scale / 64) * 64))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, *size), antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x.clone()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def prepare_photos(images: torch.Tensor, masks: torch.Tensor | None, resolution: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Photos at training size (P, H, W, 3) in [0, 1], and face masks (P, H, W) resized to them."""
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 3, 4):
        raise TrainingError(f"images: expected a batch of photos [count, height, width, channels], got shape "
                            f"{tuple(images.shape)}.")
    pixels = images[..., :3].float().cpu()
    if pixels.shape[-1] == 1:
        pixels = pixels.expand(-1, -1, -1, 3)
    count, height, width = pixels.shape[:3]
    size = training_size(height, width, resolution)
    photos = _resize(pixels.movedim(-1, 1), size).movedim(1, -1).clamp(0, 1).contiguous()
    if masks is None:
        return photos, None
    masks = masks.float().cpu()
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.ndim != 3 or masks.shape[0] not in (1, count):
        raise TrainingError(f"masks: {masks.shape[0] if masks.ndim == 3 else 'a'} mask(s) of shape "
                            f"{tuple(masks.shape)} for {count} photo(s); give one face mask per photo, or one for all.")
    for index, mask in enumerate(masks):
        if not bool((mask > 0.5).any()):
            raise TrainingError(f"masks: mask {index + 1} of {masks.shape[0]} is empty (no pixel above 0.5). Paint "
                                f"the face white (1) in every mask, or disconnect masks to detect faces.")
    if tuple(masks.shape[-2:]) != (height, width):
        log.info("IDFuse trainer: masks are %dx%d, photos %dx%d; resizing the masks", masks.shape[-1],
                 masks.shape[-2], width, height)
    resized = _resize(masks.unsqueeze(1), size)[:, 0].clamp(0, 1)
    if bool((resized > 0.5).all()):
        log.warning("IDFuse trainer: a face mask covers the whole photo; face_mask loss has no background to avoid.")
    return photos, resized.expand(count, -1, -1).contiguous()


def training_variants(photos: torch.Tensor, masks: torch.Tensor | None, augmentation: str, seed: int,
                      crops: int = 3) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The photos and their augmented copies, made once: (pixels, masks, index of each original)."""
    if augmentation not in AUGMENTATIONS:
        raise TrainingError(f"augmentation '{augmentation}' is not one of {', '.join(AUGMENTATIONS)}.")
    images = [photos]
    mask_sets = [masks]
    flip, crop = "flip" in augmentation, "crop" in augmentation
    if flip:
        images.append(photos.flip(2))
        mask_sets.append(None if masks is None else masks.flip(2))
    if crop:
        rng = torch.Generator().manual_seed(seed + 99)
        height, width = photos.shape[1:3]
        for _ in range(crops):
            for index in range(photos.shape[0]):
                scale = 0.75 + 0.25 * float(torch.rand((), generator=rng))
                h, w = max(8, round(height * scale)), max(8, round(width * scale))
                top = int(torch.randint(0, height - h + 1, (), generator=rng))
                left = int(torch.randint(0, width - w + 1, (), generator=rng))
                mirror = flip and bool(torch.rand((), generator=rng) < 0.5)
                image = _resize(photos[index:index + 1, top:top + h, left:left + w].movedim(-1, 1),
                                (height, width)).movedim(1, -1)
                images.append(image.flip(2) if mirror else image)
                if masks is not None:
                    mask = _resize(masks[index:index + 1, None, top:top + h, left:left + w], (height, width))[:, 0]
                    mask_sets.append(mask.flip(2) if mirror else mask)
    pixels = torch.cat(images).clamp(0, 1)
    all_masks = None if masks is None else torch.cat(mask_sets).clamp(0, 1)
    return pixels, all_masks, torch.arange(photos.shape[0])


def render_loss_curve(history: LossHistory, size: tuple[int, int] = (768, 384), as_pil: bool = False):
    """Diffusion (top) and attention (bottom) loss per step; a ComfyUI IMAGE (1, H, W, 3) or a PIL image."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    panels = (("diffusion loss", [s.diffusion for s in history.steps], (40, 90, 200)),
              ("attention loss", [s.attention for s in history.steps], (200, 70, 40)))
    panel_h = height // 2
    for row, (label, values, colour) in enumerate(panels):
        top, margin = row * panel_h, 8
        draw.rectangle([0, top, width - 1, top + panel_h - 1], outline=(200, 200, 200))
        if values:
            low, high = min(values), max(values)
            span = (high - low) or 1.0
            steps = max(len(values) - 1, 1)
            points = [(margin + (width - 2 * margin) * i / steps,
                       top + margin + 14 + (panel_h - 2 * margin - 14) * (1 - (v - low) / span))
                      for i, v in enumerate(values)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            else:
                draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
            label = f"{label}: last {values[-1]:.4g}  (min {low:.4g}, max {high:.4g}, {len(values)} steps)"
        draw.text((margin, top + 2), label, fill=(0, 0, 0))
    if as_pil:
        return image
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
