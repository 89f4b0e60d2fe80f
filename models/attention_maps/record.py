"""The record of one attention-map node: running sums of the words' attention, reduced on the fly.

Every recorded layer evaluation adds its (rows, words, h, w) map into the sum of its grid size, with a
weight per row; a map is the weighted mean of those sums, each upsampled to the picture. Memory is one
sum per distinct layer grid (at most four), whatever the number of steps, layers or heads.

A record belongs to one sampling run at a time: a model call at a higher noise level than the previous
one starts a new run (sigmas only fall within a run), and the record starts over. So a re-run (another
seed, another prompt) never adds to the maps of the run before, while cached nodes hand the same record on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from ..errors import IDFuseInputError
from ..unet import BlockKey
from .words import WordPositions

Grid = tuple[int, int]


class AttentionRecord:
    """What the IDFuse Attention Map node's model records, and the maps made from it."""

    def __init__(self, words: Sequence[WordPositions], prompt_length: int, layers: Sequence[BlockKey],
                 sigma_start: float = float("inf"), sigma_end: float = 0.0):
        self.words = tuple(words)
        self.prompt_length = int(prompt_length)
        self.layers = tuple(layers)
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        self.reset()

    def __deepcopy__(self, memo):
        # Clones of the patched model (ComfyUI deep-copies model_options) record into the same record.
        return self

    def reset(self) -> None:
        self._sums: dict[Grid, torch.Tensor] = {}
        self._weights: dict[Grid, torch.Tensor] = {}
        self._last_sigma: float | None = None
        self._steps: set[float] = set()
        self.rows: int | None = None  # recorded rows per model call: images x streams
        self.streams = 1

    # --- during sampling ---

    def begin_call(self, sigma: float) -> bool:
        """One model call at noise level ``sigma``: whether it is inside the recorded window. A sigma above the
        previous call's starts a new sampling run."""
        if self._last_sigma is not None and sigma > self._last_sigma:
            self.reset()
        self._last_sigma = sigma
        return self.sigma_end <= sigma <= self.sigma_start

    def add(self, grid: Grid, maps: torch.Tensor, record_rows: torch.Tensor, rows: int, streams: int,
            sigma: float) -> bool:
        """Add one layer's maps (n, words, h, w) of the record rows ``record_rows`` (n,) out of ``rows``. Calls of
        another row layout than the run's first are left out (False)."""
        if self.rows is None:
            self.rows, self.streams = rows, streams
        elif (rows, streams) != (self.rows, self.streams):
            return False
        sums = self._sums.get(grid)
        if sums is None:
            sums = self._sums[grid] = torch.zeros(rows, len(self.words), *grid, device=maps.device)
            self._weights[grid] = torch.zeros(rows, device=maps.device)
        index = record_rows.to(sums.device)
        sums.index_add_(0, index, maps.to(sums.dtype))
        self._weights[grid].index_add_(0, index, torch.ones(len(index), device=sums.device))
        self._steps.add(sigma)
        return True

    # --- afterwards ---

    @property
    def recorded(self) -> bool:
        return bool(self._sums)

    @property
    def steps(self) -> int:
        """Distinct noise levels recorded in the current run."""
        return len(self._steps)

    def state_size(self) -> int:
        """Numbers held (the memory bound: it does not grow with steps)."""
        return sum(t.numel() for t in (*self._sums.values(), *self._weights.values()))

    def maps(self, size: tuple[int, int]) -> torch.Tensor:
        """(rows, words, H, W) float32 on the CPU: each word's attention probability averaged over heads, layers
        and recorded steps, upsampled (bilinear) to ``size``."""
        if not self.recorded:
            raise IDFuseInputError("The attention record is empty: " + self.why_empty())
        total = torch.zeros(self.rows, len(self.words), *size)
        weight = torch.zeros(self.rows)
        for grid, sums in self._sums.items():
            total += F.interpolate(sums.float().cpu(), size=size, mode="bilinear", align_corners=False)
            weight += self._weights[grid].float().cpu()
        return total / weight.clamp_min(1.0)[:, None, None, None]

    def why_empty(self) -> str:
        return ("no sampling step was recorded. Sample with the MODEL output of IDFuse Attention Map (put it last, "
                "right before the sampler or guider, so no later node replaces its model wrapper), with start/end "
                "percent covering at least one step, and with the same prompt text as the positive prompt.")

    def rows_for_images(self, count: int) -> torch.Tensor:
        """The record rows that belong to ``count`` decoded images: every row, or with two streams (Infinite-ID)
        the ID stream's rows alone when only that stream was decoded."""
        rows = self.rows or 0
        if count == rows:
            return torch.arange(rows)
        if self.streams > 1 and count * self.streams == rows:
            return torch.arange(count)
        raise IDFuseInputError(
            f"images holds {count} pictures but the record has {rows // self.streams} per stream"
            f"{' (two streams: ID and text)' if self.streams > 1 else ''}: decode the latent of the sampling that "
            f"used this record's MODEL.")

    def describe(self) -> str:
        words = ", ".join(w.word for w in self.words)
        return (f"words {words}; {len(self.layers)} layers; {self.steps} steps recorded"
                f"{'; the ID stream first, then the text stream' if self.streams > 1 else ''}")
