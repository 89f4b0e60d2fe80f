"""The per-call attention patch that records the words' cross-attention probabilities.

It follows ComfyUI's ``attn2_patch`` signature ``(n, context, value, extra_options) -> (n, context, value)``
(importing nothing from it) and returns its inputs unchanged: the layer's own attention, fast kernel or
replace patch (Infinite-ID's ID cross-attention, any other), runs exactly as without it. On the record's
layers it computes the query and keys again with the layer's own projections and takes softmax(Q Kᵀ/√d)
explicitly (fast kernels never return probabilities). Placed last among the patches, it sees the keys
context the layer really attends to (e.g. the token patch's per-stage keys).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError
from ..training.probes import explicit_attention
from ..unet import BlockKey, layer_grid
from .record import AttentionRecord
from .words import word_columns

Projection = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerProjections:
    """A cross-attention layer's query and key projections (its ``to_q`` and ``to_k``)."""

    key: BlockKey
    to_q: Projection
    to_k: Projection


@dataclass(frozen=True)
class RecordedRows:
    """Which rows of one model call's batch are recorded, and where they go in the record."""

    batch_rows: torch.Tensor  # (n,) into the call's batch
    record_rows: torch.Tensor  # (n,) into the record's rows
    rows: int  # record rows per call: images x streams
    streams: int


def recorded_rows(cond_or_uncond: Sequence[int], batch: int, streams: int = 1) -> RecordedRows | None:
    """The positive chunks' rows of a batch of ``len(cond_or_uncond)`` equal chunks (0 = positive, 1 =
    negative, ComfyUI's convention). With two streams each chunk holds the text rows, then the ID rows;
    the record keeps the ID stream first (the order the Infinite-ID guider returns both streams in)."""
    chunks = len(cond_or_uncond)
    if chunks == 0 or batch % (chunks * streams):
        return None
    per_chunk = batch // chunks
    images = per_chunk // streams
    batch_rows, record_rows = [], []
    for chunk, kind in enumerate(cond_or_uncond):
        if kind != 0:
            continue
        for place in range(streams):  # record place 0 = the last stream of the chunk (the ID stream)
            stream = streams - 1 - place
            batch_rows += range(chunk * per_chunk + stream * images, chunk * per_chunk + (stream + 1) * images)
            record_rows += range(place * images, (place + 1) * images)
    if not batch_rows:
        return None
    return RecordedRows(torch.tensor(batch_rows), torch.tensor(record_rows), per_chunk, streams)


def word_attention(q: torch.Tensor, k: torch.Tensor, heads: int, columns: torch.Tensor) -> torch.Tensor:
    """(n, queries, words): each word's attention probability (its tokens' columns summed), mean over heads."""
    return explicit_attention(q, k, heads).mean(1) @ columns.to(torch.float32)


class WordAttentionProbe:
    """``attn2_patch`` for one model call (made per call by the node's model wrapper, never copied)."""

    def __init__(self, record: AttentionRecord, layers: Mapping[tuple[str, int, int], LayerProjections],
                 rows: RecordedRows, sigma: float):
        self.record = record
        self.layers = layers
        self.rows = rows
        self.sigma = sigma
        self._columns: dict[tuple[int, torch.device], torch.Tensor | None] = {}

    def __deepcopy__(self, memo):
        return self

    def _word_columns(self, context_length: int, device: torch.device) -> torch.Tensor | None:
        key = (context_length, device)
        if key not in self._columns:
            self._columns[key] = word_columns(self.record.words, self.record.prompt_length, context_length, device)
        return self._columns[key]

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
        layer = self.layers.get((*extra_options["block"], extra_options["block_index"]))
        if layer is None or context is None or context.ndim != 3:
            return n, context, value
        columns = self._word_columns(context.shape[1], context.device)
        if columns is None:  # not the prompt the words were found in
            return n, context, value
        rows = self.rows.batch_rows.to(n.device)
        with torch.no_grad():
            q = layer.to_q(n[rows])
            k = layer.to_k(context[rows])
            probabilities = word_attention(q, k, extra_options["n_heads"], columns)
        grid = layer_grid(extra_options["original_shape"][-2:], layer.key.downscale)
        if grid[0] * grid[1] != probabilities.shape[1]:
            raise UnsupportedModelError(
                f"Cross-attention layer {layer.key} has {probabilities.shape[1]} tokens, expected a {grid[0]}x"
                f"{grid[1]} grid: the block table does not fit this model. Use a plain SD1.5 or SDXL checkpoint.")
        maps = probabilities.transpose(1, 2).reshape(len(rows), len(self.record.words), *grid)
        self.record.add(grid, maps, self.rows.record_rows, self.rows.rows, self.rows.streams, self.sigma)
        return n, context, value
