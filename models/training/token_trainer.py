"""Training SeFi-IDE identity tokens (optional LoRA) against a frozen diffusion model. Plain torch.

The host (the ComfyUI glue in nodes/train.py and nodes/glue/training_models.py) provides the frozen
model as callables: ``encode`` (a prompt template with word vectors spliced in -> context),
``denoise`` (noisy latent, sigma, keys context, values context -> predicted x0, in the model's own
parameterisation) and its ``model_sampling``. This module owns what training an identity means:
sampling (each photo's caption template, if it has one), the stage of each sample, the losses,
evaluation, the validation loss of held-out photos, and the state needed to resume; the
pieces any training loop uses (diffusion loss, schedule, loss scaling, optimiser state) are in loop.py.

Every random draw of step k comes from a generator seeded with (seed, k), so a run resumed at
step k repeats exactly what an uninterrupted run would have done from there (the learning-rate
schedule included: it keeps the first run's total, and holds its last rate after it).

Each step records each attention term's value; step 1 and every GRADIENT_SHARE_EVERY-th step also
the norm of the gradient each weighted term (diffusion, λ × each attention term) gives the token
generator and the LoRA, so the report and the loss plot show which term actually trains them.
"""

from __future__ import annotations

import json
import logging
import math
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
from .optimizers import make_optimizer
from .probes import AttentionProbes, ProbeBatch, attention_maps, face_share
from .settings import GRADIENT_SHARE_EVERY, TrainingSettings

log = logging.getLogger("idfuse.training")


@dataclass
class TrainingData:
    """Encoded photos. Variants are the photos and their augmented copies, all the same size, in rounds of
    the P photos in their order (training_variants: the originals, then each flipped or cropped round), so
    variant v is a copy of photo v % P."""

    latents: torch.Tensor  # (V, C, h, w), already scaled for the model (process_latent_in)
    masks: torch.Tensor | None  # (V, h, w) face masks at latent resolution, 1 = face
    originals: torch.Tensor  # (P,) variant index of each photo as given (for evaluation)
    # (P,) per photo the prompt-table index of its caption's template, -1 = no caption (it draws a shared one).
    photo_templates: torch.Tensor | None = None

    def __post_init__(self) -> None:
        photos = self.num_photos
        if self.num_variants % photos or not torch.equal(self.originals.cpu().long(), torch.arange(photos)):
            raise TrainingError(f"The training data has {self.num_variants} variants of {photos} photos with "
                                f"originals {self.originals.tolist()}: variants must come in rounds of the photos in "
                                f"their order (models/training/photos.py training_variants).")
        if self.photo_templates is not None and tuple(self.photo_templates.shape) != (photos,):
            raise TrainingError(f"photo_templates has shape {tuple(self.photo_templates.shape)}; expected one "
                                f"caption template index per photo, ({photos},).")

    @property
    def num_variants(self) -> int:
        return self.latents.shape[0]

    @property
    def num_photos(self) -> int:
        return self.originals.shape[0]

    def photo_of(self, variants: torch.Tensor) -> torch.Tensor:
        """The photo each variant is a copy of."""
        return variants % self.num_photos


@dataclass
class PromptTable:
    """Per prompt template: where the placeholder is, and for reference_prompt the reference encoding."""

    placeholder_positions: torch.Tensor  # (T,)
    reference_contexts: torch.Tensor | None = None  # (T, L, C) keys context of the initialiser's prompt
    reference_positions: torch.Tensor | None = None  # (T,)
    # The first this many templates are settings.templates, drawn for photos without a caption; the rest
    # are the photos' caption templates. None: all of them (no captions).
    num_shared_templates: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.shared_templates <= self.num_templates:
            raise TrainingError(f"num_shared_templates {self.num_shared_templates} of a prompt table of "
                                f"{self.num_templates} templates; it must be between 1 and their number.")

    @property
    def num_templates(self) -> int:
        return self.placeholder_positions.shape[0]

    @property
    def shared_templates(self) -> int:
        """How many templates (the first ones) photos without a caption draw from."""
        return self.num_templates if self.num_shared_templates is None else self.num_shared_templates


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
    attention: float  # the attention loss of the mode (the sum of its terms), unweighted
    total: float
    learning_rate: float
    # Each attention loss of the mode by name (unweighted; ``both`` has two), when it was recorded.
    terms: dict[str, float] = field(default_factory=dict)
    # On measured steps: per parameter group ("tokens": the generator, "lora": the adapters), the norm of the
    # gradient each weighted term of the total loss (diffusion, λ·each attention term) gives the step.
    gradient_norms: dict[str, dict[str, float]] | None = None


def gradient_shares(norms: dict[str, float]) -> dict[str, float]:
    """Each term's gradient norm over the sum of the terms' norms (a cancelling pair still counts as
    two contributions); all zero when no term gives a gradient."""
    total = sum(norms.values())
    return {name: (norm / total if total > 0 else 0.0) for name, norm in norms.items()}


@dataclass
class Evaluation:
    maps: torch.Tensor  # (P, h, w) the placeholder's attention per photo (latent grid)
    share: torch.Tensor | None  # (P,) share of it inside the face mask
    diffusion_loss: float


TERM_COLUMN = "loss."  # history column of an attention term: loss.<term>
GRADIENT_COLUMN = "grad."  # of a gradient norm: grad.<group>.<term>
BASE_COLUMNS = 5  # step, diffusion, attention, total, learning rate (all a 0.2.0 history has)
# The validation loss is the mean over this many timesteps, the centres of equal parts of the schedule:
# the expectation of the training loss (uniform timesteps) on the held-out photo, with the same noise at
# every measurement, whatever num_stages is (with one stage, stage centres would be a single timestep).
VALIDATION_TIMESTEPS = 8
VALIDATION_NOISE_SEED = 24_680  # added to the run's seed (evaluate's noise is another draw)


@dataclass
class LossHistory:
    steps: list[StepLosses] = field(default_factory=list)
    # (step, validation loss) per measurement (record_validation), one per step, in step order.
    validation: list[tuple[int, float]] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        """Names of the columns after the first five: the attention terms and the measured gradient norms."""
        terms = {name for s in self.steps for name in s.terms}
        norms = {f"{group}.{name}" for s in self.steps for group, by_term in (s.gradient_norms or {}).items()
                 for name in by_term}
        return [TERM_COLUMN + n for n in sorted(terms)] + [GRADIENT_COLUMN + n for n in sorted(norms)]

    def to_tensor(self, columns: list[str] | None = None) -> torch.Tensor:
        """(steps, 5 + len(columns)); NaN where a step has no value (gradients not measured)."""
        columns = self.columns if columns is None else columns
        nan = float("nan")
        rows = []
        for s in self.steps:
            row = [s.step, s.diffusion, s.attention, s.total, s.learning_rate]
            for column in columns:
                if column.startswith(TERM_COLUMN):
                    row.append(s.terms.get(column[len(TERM_COLUMN):], nan))
                else:
                    group, name = column[len(GRADIENT_COLUMN):].split(".", 1)
                    row.append((s.gradient_norms or {}).get(group, {}).get(name, nan))
            rows.append(row)
        return torch.tensor(rows, dtype=torch.float64).reshape(-1, BASE_COLUMNS + len(columns))

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, columns: list[str] | None = None) -> LossHistory:
        """The inverse of ``to_tensor``; a history of five columns (saved by 0.2.0) needs no ``columns``."""
        columns = columns or []
        if tensor.shape[1] != BASE_COLUMNS + len(columns):
            raise TrainingError(f"The training state's loss history has {tensor.shape[1]} columns, its metadata "
                                f"names {BASE_COLUMNS + len(columns)}; the .trainstate file is damaged: start a "
                                f"new run, or delete the .trainstate to resume without the optimiser state.")
        steps = []
        for row in tensor.tolist():
            losses = StepLosses(int(row[0]), *(float(v) for v in row[1:BASE_COLUMNS]))
            for column, value in zip(columns, row[BASE_COLUMNS:], strict=True):
                if value != value:  # NaN: no value at this step
                    continue
                if column.startswith(TERM_COLUMN):
                    losses.terms[column[len(TERM_COLUMN):]] = value
                else:
                    group, name = column[len(GRADIENT_COLUMN):].split(".", 1)
                    losses.gradient_norms = losses.gradient_norms or {}
                    losses.gradient_norms.setdefault(group, {})[name] = value
            steps.append(losses)
        return cls(steps)

    def validation_tensor(self) -> torch.Tensor:
        """(measurements, 2): step and validation loss."""
        return torch.tensor(self.validation, dtype=torch.float64).reshape(-1, 2)

    @staticmethod
    def validation_from_tensor(tensor: torch.Tensor) -> list[tuple[int, float]]:
        if tensor.ndim != 2 or tensor.shape[1] != 2:
            raise TrainingError(f"The training state's validation history has shape {tuple(tensor.shape)}, not "
                                f"(measurements, 2); the .trainstate file is damaged: start a new run, or delete "
                                f"the .trainstate to resume without the optimiser state.")
        return [(int(step), float(value)) for step, value in tensor.tolist()]


def _held_after(factor: Callable[[int], float], last: int) -> Callable[[int], float]:
    return lambda index: factor(min(index, last))


class IdentityTrainer:
    """SeFi-IDE: the generator's per-stage key/value vectors (and optional LoRA adapters) trained with the
    diffusion loss plus ``attention_weight`` × the attention loss named by ``attention_mode`` (each of its
    terms times its own factor, ``term_scales``: reference_prompt's is reference_loss_scale)."""

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
        self.term_scales = self.attention_loss.term_scales(settings)
        if self.attention_loss.needs_masks and data.masks is None:
            raise TrainingError(f"Attention-loss mode '{settings.attention_mode}' needs face masks.")
        if self.attention_loss.needs_reference and prompts.reference_contexts is None:
            raise TrainingError(f"Attention-loss mode '{settings.attention_mode}' needs the reference prompts.")
        captions = data.photo_templates
        if captions is not None and not bool(((captions >= -1) & (captions < prompts.num_templates)).all()):
            raise TrainingError(f"photo_templates {captions.tolist()} point outside the prompt table of "
                                f"{prompts.num_templates} templates (-1 = no caption).")
        self.optimizer = make_optimizer(settings.optimizer, self.parameters(), settings.learning_rate)
        # The total the LR schedule is made for: this run's steps, or (resumed) the first run's.
        self.schedule_steps = settings.steps
        self.scheduler = self._lr_scheduler(self.schedule_steps)
        self.gradient_share_every = GRADIENT_SHARE_EVERY  # 0: never measure the terms' gradients
        self.scaler = LossScaler(host.device.type) if host.loss_scaling else None
        self.step = 0
        self.history = LossHistory()
        sampling = host.model_sampling
        self.num_timesteps = int(sampling.sigmas.shape[0])

    def term_weights(self) -> dict[str, float]:
        """Each attention term's weight in the loss: attention_weight × its own factor."""
        return {name: self.settings.attention_weight * scale for name, scale in self.term_scales.items()}

    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.parameter_groups().values() for p in group]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trained parameters by what they are: the token generator, and the LoRA adapters if any."""
        groups = {"tokens": list(self.generator.parameters())}
        if self.adapters is not None:
            groups["lora"] = list(self.adapters.parameters())
        return groups

    def _lr_scheduler(self, total_steps: int):
        """The schedule for ``total_steps``; after them the rate stays at that of the last of them (a
        resumed run given more steps goes on at the final rate of the schedule it started)."""
        scheduler = make_lr_scheduler(self.settings.lr_schedule, self.optimizer, self.settings.warmup_steps,
                                      total_steps)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            last = max(total_steps - 1, 0)
            scheduler.lr_lambdas = [_held_after(f, last) for f in scheduler.lr_lambdas]
        return scheduler

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

    def _denoised(self, x0, templates, timesteps, noise, probe_batch: ProbeBatch | None):
        """Sigma of each row and the model's x0 prediction of ``x0`` noised with ``noise`` at ``timesteps``;
        the probes record the pass when given a batch (without one the loss layers keep fast attention)."""
        sigma, stages = self._sigmas(timesteps)
        keys_ctx, values_ctx = self._contexts(templates, stages)
        sampling = self.host.model_sampling
        x_noisy = sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise.to(self.host.device), x0)
        if probe_batch is not None:
            self.probes.begin(probe_batch)
        with autocast(self.host.device, self.host.autocast_dtype):
            x0_pred = self.host.denoise(x_noisy, sigma, keys_ctx, values_ctx, templates.tolist())
        return sigma, x0_pred

    def _forward(self, variants, templates, timesteps, noise, with_reference: bool):
        """Predicted and true x0 of a batch, with the probes' records of the pass."""
        x0 = self.data.latents[variants].to(self.host.device)
        sigma, x0_pred = self._denoised(x0, templates, timesteps, noise, self._probe_batch(templates, with_reference))
        return sigma, x0_pred, x0, self.probes.collected()

    def _templates(self, variants: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Each sample's template: its photo's caption if it has one, else one drawn among the shared ones.
        The draw is made for every sample (so the draws after it stay those of a run without captions)."""
        drawn = torch.randint(self.prompts.shared_templates, (len(variants),), generator=rng)
        captions = self.data.photo_templates
        if captions is None:
            return drawn
        caption = captions[self.data.photo_of(variants)]
        return torch.where(caption >= 0, caption, drawn)

    def _micro_batch(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.settings
        rng = step_generator(s.seed, step, micro)
        variants = torch.randint(self.data.num_variants, (s.batch_size,), generator=rng)
        templates = self._templates(variants, rng)
        timesteps = torch.randint(0, self.num_timesteps, (s.batch_size,), generator=rng)
        noise = torch.randn((s.batch_size, *self.data.latents.shape[1:]), generator=rng)
        sigma, x0_pred, x0, records = self._forward(variants, templates, timesteps, noise,
                                                    self.attention_loss.needs_reference)
        weight = None
        if s.min_snr_gamma > 0:
            weight = min_snr_weight(self.host.model_sampling, timesteps, s.min_snr_gamma).to(x0.device)
        diffusion = diffusion_loss(self.host.model_sampling, sigma, x0_pred, x0, weight)
        masks = None if self.data.masks is None else self.data.masks[variants]
        terms = {name: term.to(diffusion.device) for name, term in self.attention_loss.terms(records, masks).items()}
        return diffusion, terms

    def measures_gradients(self, step: int) -> bool:
        """Whether step ``step`` (1-based) measures each term's gradient: the first, then every n-th."""
        every = self.gradient_share_every
        return every > 0 and (step == 1 or step % every == 0)

    def _term_gradients(self, weighted: dict[str, torch.Tensor], sums: dict[str, dict[str, torch.Tensor]]) -> None:
        """Adds each weighted term's gradient (as the micro-batch's backward gives it, without touching
        ``.grad``) to ``sums[term][group]``, flattened; the graph is kept for the backward of the total."""
        groups = self.parameter_groups()
        parameters = [p for group in groups.values() for p in group]
        micro_share = 1.0 / self.settings.gradient_accumulation
        for name, term in weighted.items():
            loss = term * micro_share
            if self.scaler is not None:  # float16: unscaled gradients of a small term would underflow
                loss = self.scaler.scale(loss)
            grads = [None] * len(parameters)
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
            flat, offset = {}, 0
            for group, members in groups.items():
                flat[group] = torch.cat([(torch.zeros_like(p) if g is None else g.detach()).flatten().float()
                                         for p, g in zip(members, grads[offset:offset + len(members)], strict=True)])
                offset += len(members)
            for group, vector in flat.items():
                total = sums.setdefault(name, {})
                total[group] = vector if group not in total else total[group] + vector

    def _gradient_norms(self, sums: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, float]] | None:
        """Per group and term, the norm of the summed gradient; None when nothing was measured, or when a
        gradient overflowed (float16: the step is skipped, its norms mean nothing)."""
        scale = 1.0 if self.scaler is None else self.scaler.get_scale()
        groups = [g for g in self.parameter_groups() if any(g in by_group for by_group in sums.values())]
        norms = {group: {name: float(by_group[group].norm()) / scale for name, by_group in sums.items()}
                 for group in groups}
        finite = all(math.isfinite(v) for by_term in norms.values() for v in by_term.values())
        return norms if norms and finite else None

    def train_step(self) -> StepLosses:
        """One optimiser step (gradient_accumulation micro-batches). Gradients stay readable until the next."""
        s = self.settings
        step = self.step + 1
        measure = self.measures_gradients(step)
        self.optimizer.zero_grad(set_to_none=True)
        diffusion_sum = attention_sum = scaled_sum = 0.0
        term_sums: dict[str, float] = {}
        gradient_sums: dict[str, dict[str, torch.Tensor]] = {}
        try:
            for micro in range(s.gradient_accumulation):
                diffusion, terms = self._micro_batch(self.step, micro)
                # attention: the mode's loss as reported (its terms' sum); scaled: as trained (× each term's factor)
                attention = torch.stack(list(terms.values())).sum() if terms else torch.zeros_like(diffusion)
                scaled = (torch.stack([self.term_scales[n] * t for n, t in terms.items()]).sum() if terms
                          else attention)
                total = diffusion + s.attention_weight * scaled
                if not torch.isfinite(total):
                    raise NonFiniteLossError(step, "loss", {"diffusion": float(diffusion.detach()),
                                                            "attention": float(attention.detach())})
                if measure and terms:  # without an attention term the diffusion has the whole gradient
                    weighted = {n: s.attention_weight * self.term_scales[n] * t for n, t in terms.items()}
                    self._term_gradients({"diffusion": diffusion, **weighted}, gradient_sums)
                backward(total / s.gradient_accumulation, self.scaler)
                diffusion_sum += float(diffusion.detach())
                attention_sum += float(attention.detach())
                scaled_sum += float(scaled.detach())
                for name, term in terms.items():
                    term_sums[name] = term_sums.get(name, 0.0) + float(term.detach())
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
                            (diffusion_sum + s.attention_weight * scaled_sum) / n, learning_rate,
                            {name: value / n for name, value in term_sums.items()},
                            self._gradient_norms(gradient_sums))
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

    @torch.no_grad()
    def record_validation(self, latents: torch.Tensor, chunk: int = 4) -> float:
        """The diffusion loss of held-out latents (N, C, h, w), scaled for the model like TrainingData.latents,
        at the current step; recorded in ``history.validation`` (a second measurement at the same step
        replaces the first). Fixed timesteps (VALIDATION_TIMESTEPS over the schedule) and noise (from the
        seed alone), template 0, no attention probes, min-SNR weighted as training is: the same trainer
        state always gives the same value. No random state, parameter or gradient is touched."""
        s = self.settings
        if latents.ndim != 4 or latents.shape[0] == 0 or latents.shape[1] != self.data.latents.shape[1]:
            raise TrainingError(f"Validation latents of shape {tuple(latents.shape)}: expected a batch (count, "
                                f"{self.data.latents.shape[1]}, height, width) encoded like the training photos.")
        count = latents.shape[0]
        self.probes.end()  # no attention recorded: the loss layers keep the model's own attention
        timesteps = ((torch.arange(VALIDATION_TIMESTEPS) + 0.5) * self.num_timesteps / VALIDATION_TIMESTEPS).long()
        # Every (timestep, latent) pair is one row, so a single photo still fills the chunks.
        row_timesteps = timesteps.repeat_interleave(count)
        row_latents = torch.arange(count).repeat(VALIDATION_TIMESTEPS)
        rng = torch.Generator().manual_seed(s.seed + VALIDATION_NOISE_SEED)
        noise = torch.randn((len(row_timesteps), *latents.shape[1:]), generator=rng)
        loss_sum = 0.0
        for start in range(0, len(row_timesteps), chunk):
            rows = slice(start, start + chunk)
            steps_of_rows = row_timesteps[rows]
            x0 = latents[row_latents[rows]].to(self.host.device)
            templates = torch.zeros(len(steps_of_rows), dtype=torch.long)
            sigma, x0_pred = self._denoised(x0, templates, steps_of_rows, noise[rows], probe_batch=None)
            weight = None
            if s.min_snr_gamma > 0:
                weight = min_snr_weight(self.host.model_sampling, steps_of_rows, s.min_snr_gamma).to(x0.device)
            loss_sum += float(diffusion_loss(self.host.model_sampling, sigma, x0_pred, x0, weight)) * len(steps_of_rows)
        value = loss_sum / len(row_timesteps)
        history = self.history.validation
        if history and history[-1][0] == self.step:
            history.pop()
        history.append((self.step, value))
        log.debug("step %d: validation loss %.5f", self.step, value)
        return value

    # --- state for resuming --------------------------------------------------------------------

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Optimiser moments, step, loss scale and loss history (the trainable weights are saved elsewhere)."""
        tensors, metadata = optimizer_state(self.optimizer, self.step, self.scaler)
        columns = self.history.columns
        tensors["history"] = self.history.to_tensor(columns)
        metadata["history_columns"] = json.dumps(columns)
        if self.history.validation:
            tensors["validation_history"] = self.history.validation_tensor()
        metadata["settings"] = json.dumps(self.settings.to_dict(), sort_keys=True)
        metadata["lr_schedule_steps"] = str(self.schedule_steps)
        return tensors, metadata

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        self.step = load_optimizer_state(
            self.optimizer, tensors, metadata, self.scaler,
            "the LoRA rank/targets or the generator differ from the run being resumed. Use the same settings, or "
            "start a new run.")
        columns = json.loads(metadata.get("history_columns", "[]"))
        self.history = LossHistory.from_tensor(tensors["history"], columns) if "history" in tensors else LossHistory()
        if "validation_history" in tensors:  # states of earlier versions, or of runs without validation, have none
            self.history.validation = LossHistory.validation_from_tensor(tensors["validation_history"])
        # The schedule of the run being resumed, for the total it was made for (its first run's steps), so
        # every step gets the rate the uninterrupted run would have had; states of 0.2.0 name only steps.
        saved_total = metadata.get("lr_schedule_steps") or json.loads(metadata.get("settings", "{}")).get("steps")
        if saved_total is not None and int(saved_total) != self.schedule_steps:
            self.schedule_steps = int(saved_total)
            self.scheduler = self._lr_scheduler(self.schedule_steps)
        advance_lr_scheduler(self.scheduler, self.step)
