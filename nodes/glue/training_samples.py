"""Sample images while IDFuse Train Identity trains: every sample prompt rendered with the identity as it is at
that step through the pack's own token path (IDFuse Encode With ID's encoding, IDFuse Apply ID Tokens' patch on a
clone of the input model, ComfyUI's sampler, the VAE), one PNG per round in <save_name>.samples/, and the
rounds collected for the node's samples output.

Each round starts from the same noise (the run's seed) with the same sampler settings, so two rounds differ only
by what training changed: the tokens, and the LoRA, whose forward hooks are on the shared UNet layers while the
run trains (they act on every clone). Rendering draws nothing from torch's global random state and changes no
trained parameter: a run with samples trains exactly as one without.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import comfy.model_management
import comfy.sample
import torch

from ...models.files import atomic_write
from ...models.tokens.format import IDTokens
from ...models.training.sample_grid import message_image, round_picture, samples_grid
from ...models.training.settings import TrainingSettings
from ..tokens import IDFuseApplyIDTokens, IDFuseEncodeWithID
from .encoder_validation import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_SCHEDULER
from .training_options import parse_sample_prompts

log = logging.getLogger("idfuse.nodes")

NEGATIVE_PROMPT = ""


def sample_steps_due(settings: TrainingSettings, step: int) -> bool:
    """Whether the run samples (and measures the validation loss) after ``step``: every sample_every steps
    and after the last one; never with sample_every 0."""
    every = settings.sample_every
    return every > 0 and step > 0 and (step % every == 0 or step == settings.steps)


class SampleRounds:
    """The sample prompts of a run, checked before training, and the rounds rendered so far."""

    def __init__(self, model, clip, vae, settings: TrainingSettings, folder: Path):
        self.model, self.clip, self.vae, self.settings = model, clip, vae, settings
        self.folder = folder
        self.prompts = parse_sample_prompts("\n".join(settings.sample_prompts), settings.placeholder)
        # (step, images (P, H, W, 3) uint8: as the PNG stores them, a quarter of float32's memory) of this run
        self.rounds: list[tuple[int, torch.Tensor]] = []
        self.latest_picture = None  # the last round as saved (PIL), for the progress preview
        self.seconds = 0.0
        self._negative = None

    @property
    def enabled(self) -> bool:
        return bool(self.prompts) and self.settings.sample_every > 0

    def _negative_conditioning(self) -> list:
        if self._negative is None:
            cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(NEGATIVE_PROMPT), return_pooled=True)
            options = {} if pooled is None else {"pooled_output": pooled.float().cpu()}
            self._negative = [[cond.float().cpu(), options]]
        return self._negative

    def _render(self, tokens: IDTokens, prompt: str) -> torch.Tensor:
        """One prompt as IDFuse Encode With ID -> IDFuse Apply ID Tokens -> KSampler -> VAE Decode make it."""
        s = self.settings
        positive = IDFuseEncodeWithID().encode(self.clip, tokens, prompt)[0]
        model = IDFuseApplyIDTokens().apply(self.model, positive, 1.0, 0.0, 1.0)[0]
        empty = torch.zeros(1, 4, s.sample_size // 8, s.sample_size // 8)
        latent = comfy.sample.fix_empty_latent_channels(model, empty)
        # The noise ComfyUI's KSampler makes for this seed, from a generator of its own (prepare_noise would
        # reseed the global random state, which the training run must not see change).
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(s.seed))
        samples = comfy.sample.sample(model, noise, s.sample_steps, DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_SCHEDULER,
                                      positive, self._negative_conditioning(), latent, disable_pbar=True, seed=s.seed)
        return self.vae.decode(samples.to(comfy.model_management.intermediate_device()))[:1].float().cpu()

    def render(self, tokens: IDTokens, step: int) -> Path:
        """Renders every prompt with ``tokens``, saves the round as step_<step>.png and keeps it for the grid."""
        started = time.monotonic()
        device = comfy.model_management.get_torch_device()
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            images = torch.cat([self._render(tokens, prompt) for prompt in self.prompts])
        picture = round_picture(images, self.prompts, step)
        path = atomic_write(self.folder / f"step_{step:06d}.png", lambda tmp: picture.save(tmp, format="PNG"))
        self.rounds.append((step, (images.clamp(0, 1) * 255).round().to(torch.uint8)))
        self.latest_picture = picture
        seconds = time.monotonic() - started
        self.seconds += seconds
        log.info("Sample images at step %d (%d prompts, %d steps at %d px) in %.1f s: %s", step, len(self.prompts),
                 self.settings.sample_steps, self.settings.sample_size, seconds, path)
        return path

    def grid(self) -> torch.Tensor:
        """The samples output: a row per prompt, a column per round of this run; a short note without rounds."""
        if self.rounds:
            return samples_grid(self.rounds, self.prompts)
        if not self.prompts:
            return message_image("No sample prompts (IDFuse Training Options' sample_prompts).")
        if self.settings.sample_every == 0:
            return message_image("sample_every is 0: no sample images.")
        return message_image("No sample round in this run (no step was trained).")
