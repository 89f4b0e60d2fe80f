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
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NonFiniteLossError, TrainingError
from ..tokens.generator import IDTokenGenerator
from ..unet import stage_of_timestep
from .attention import (
    MASK_MODES,
    REFERENCE_MODES,
    AttentionProbes,
    ProbeBatch,
    attention_loss,
    attention_maps,
    face_share,
)
from .settings import LR_SCHEDULES, MAX_SKIPPED_STEPS, TrainingSettings

log = logging.getLogger(__name__)

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
    # The model computes in float16 (autocast, or float16 weights): gradients would underflow, so the
    # loss is scaled (torch.amp.GradScaler) and steps with overflowing gradients are skipped.
    loss_scaling: bool = False


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
        self.scaler = torch.amp.GradScaler(host.device.type) if host.loss_scaling else None
        self.skipped_steps = 0  # in a row, by loss scaling
        self.skipped_total = 0
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
                share = total / s.gradient_accumulation
                (share if self.scaler is None else self.scaler.scale(share)).backward()
                diffusion_sum += float(diffusion.detach())
                attention_sum += float(attention.detach())
        finally:
            self.probes.end()
        learning_rate = self.optimizer.param_groups[0]["lr"]
        self._optimizer_step(step, {"diffusion": diffusion_sum, "attention": attention_sum})
        if self.scheduler is not None:
            self.scheduler.step()
        self.step = step
        n = s.gradient_accumulation
        losses = StepLosses(step, diffusion_sum / n, attention_sum / n,
                            (diffusion_sum + s.attention_weight * attention_sum) / n, learning_rate)
        self.history.steps.append(losses)
        return losses

    def _optimizer_step(self, step: int, losses: dict[str, float]) -> None:
        """The optimiser step; with loss scaling, a step whose gradients overflowed is skipped (and the
        scale halved), as mixed-precision training does; without it, such gradients are an error."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.parameters())
        if self.scaler is None:
            if not finite:
                raise NonFiniteLossError(step, "gradient", losses)
            self.optimizer.step()
            return
        self.scaler.step(self.optimizer)  # skips the update when the gradients are not finite
        self.scaler.update()
        self.skipped_steps = 0 if finite else self.skipped_steps + 1
        self.skipped_total += 0 if finite else 1
        if not finite:
            log.info("IDFuse trainer: step %d skipped, float16 gradients overflowed; loss scale now %g", step,
                     self.scaler.get_scale())
        if self.skipped_steps >= MAX_SKIPPED_STEPS:
            raise NonFiniteLossError(step, f"gradient in {MAX_SKIPPED_STEPS} float16 steps in a row", losses)

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
        if self.scaler is not None:
            metadata["loss_scaler"] = json.dumps({**self.scaler.state_dict(), "skipped_steps": self.skipped_steps,
                                                  "skipped_total": self.skipped_total})
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
        if self.scaler is not None and "loss_scaler" in metadata:
            scaler_state = json.loads(metadata["loss_scaler"])
            self.skipped_steps = scaler_state.pop("skipped_steps", 0)
            self.skipped_total = scaler_state.pop("skipped_total", 0)
            self.scaler.load_state_dict(scaler_state)
        self.history = LossHistory.from_tensor(tensors["history"]) if "history" in tensors else LossHistory()
        if self.scheduler is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": on purpose
                for _ in range(self.step):
                    self.scheduler.step()
