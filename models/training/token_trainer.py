"""Training SeFi-IDE identity tokens (optional LoRA) against a frozen diffusion model. Plain torch.

The host (the ComfyUI glue in nodes/train.py and nodes/glue/training_models.py) provides the frozen
model as callables: ``encode`` (a prompt template with word vectors spliced in -> context),
``denoise`` (noisy latent, sigma, keys context, values context -> predicted x0, in the model's own
parameterisation) and its ``model_sampling``. This module owns what training an identity means:
sampling, the stage of each sample, the losses, evaluation, and the state needed to resume; the
pieces any training loop uses (diffusion loss, schedule, loss scaling, optimiser state) are in loop.py.

Every random draw of step k comes from a generator seeded with (seed, k), so a run resumed at
step k repeats exactly what an uninterrupted run would have done from there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NonFiniteLossError, TrainingError
from ..tokens.generator import IDTokenGenerator
from ..unet import stage_of_timestep
from .loop import (
    LossScaler,
    advance_lr_scheduler,
    autocast,
    backward,
    diffusion_loss,
    load_optimizer_state,
    make_lr_scheduler,
    min_snr_weight,
    optimizer_state,
    optimizer_step,
    step_generator,
)
from .losses import attention_loss_for
from .probes import AttentionProbes, ProbeBatch, attention_maps, face_share
from .settings import TrainingSettings

log = logging.getLogger("idfuse.training")


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


class IdentityTrainer:
    """SeFi-IDE: the generator's per-stage key/value vectors (and optional LoRA adapters) trained with the
    diffusion loss plus ``attention_weight`` × the attention loss named by ``attention_mode``."""

    def __init__(self, settings: TrainingSettings, host: Host, data: TrainingData, prompts: PromptTable,
                 probes: AttentionProbes, generator: IDTokenGenerator, adapters: nn.ModuleDict | None = None):
        self.settings = settings
        self.host = host
        self.data = data
        self.prompts = prompts
        self.probes = probes
        self.generator = generator
        self.adapters = adapters
        self.attention_loss = attention_loss_for(settings.attention_mode)
        if self.attention_loss.needs_masks and data.masks is None:
            raise TrainingError(f"Attention-loss mode '{settings.attention_mode}' needs face masks.")
        if self.attention_loss.needs_reference and prompts.reference_contexts is None:
            raise TrainingError(f"Attention-loss mode '{settings.attention_mode}' needs the reference prompts.")
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=settings.learning_rate, weight_decay=0.0)
        self.scheduler = make_lr_scheduler(settings.lr_schedule, self.optimizer, settings.warmup_steps,
                                           settings.steps)
        self.scaler = LossScaler(host.device.type) if host.loss_scaling else None
        self.step = 0
        self.history = LossHistory()
        sampling = host.model_sampling
        self.num_timesteps = int(sampling.sigmas.shape[0])

    def parameters(self) -> list[nn.Parameter]:
        params = list(self.generator.parameters())
        if self.adapters is not None:
            params += list(self.adapters.parameters())
        return params

    @property
    def skipped_total(self) -> int:
        """Steps float16 loss scaling skipped in this run and the runs it resumes."""
        return 0 if self.scaler is None else self.scaler.skipped_total

    # --- one optimiser step -------------------------------------------------------------------

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
        with autocast(self.host.device, self.host.autocast_dtype):
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
                                                    self.attention_loss.needs_reference)
        weight = None
        if s.min_snr_gamma > 0:
            weight = min_snr_weight(self.host.model_sampling, timesteps, s.min_snr_gamma).to(x0.device)
        diffusion = diffusion_loss(self.host.model_sampling, sigma, x0_pred, x0, weight)
        masks = None if self.data.masks is None else self.data.masks[variants]
        attention = self.attention_loss(records, masks).to(diffusion.device)
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
                backward(total / s.gradient_accumulation, self.scaler)
                diffusion_sum += float(diffusion.detach())
                attention_sum += float(attention.detach())
        finally:
            self.probes.end()
        learning_rate = self.optimizer.param_groups[0]["lr"]
        summed = {"diffusion": diffusion_sum, "attention": attention_sum}
        # Until here nothing trained has changed, so an interrupt (raised from any layer's forward in
        # newer ComfyUI) leaves the state of the previous step. From the optimiser step to the end only
        # plain torch runs (no layer forward, no interrupt check): parameters of this step are never
        # seen with the counter of the previous one.
        optimizer_step(self.optimizer, self.parameters(), step, summed, self.scaler)
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
            log.debug("step %d/%d: diffusion %.5f, attention %.5f, lr %.3g", losses.step, self.settings.steps,
                      losses.diffusion, losses.attention, losses.learning_rate)
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
        """Optimiser moments, step, loss scale and loss history (the trainable weights are saved elsewhere)."""
        tensors, metadata = optimizer_state(self.optimizer, self.step, self.scaler)
        tensors["history"] = self.history.to_tensor()
        metadata["settings"] = json.dumps(self.settings.to_dict(), sort_keys=True)
        return tensors, metadata

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        self.step = load_optimizer_state(
            self.optimizer, tensors, metadata, self.scaler,
            "the LoRA rank/targets or the generator differ from the run being resumed. Use the same settings, or "
            "start a new run.")
        self.history = LossHistory.from_tensor(tensors["history"]) if "history" in tensors else LossHistory()
        advance_lr_scheduler(self.scheduler, self.step)
