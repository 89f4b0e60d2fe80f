"""The trainable part of an identity: the K/V token generator (SeFi-IDE).

Plain torch. The generator is a small self-attention block over the initialiser word's input
embedding (one per text encoder) and 2S learned queries (S stages x {key, value}); each query's
output becomes one word vector per encoder. It starts close to the initialiser's embedding, so
training begins from "person" and moves away only as far as the losses ask.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import IDTokensError


@dataclass(frozen=True)
class GeneratorConfig:
    num_stages: int
    encoders: dict[str, int]  # text encoder name -> word-embedding width
    width: int = 256
    heads: int = 4

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GeneratorConfig:
        return cls(num_stages=int(data["num_stages"]), encoders={k: int(v) for k, v in data["encoders"].items()},
                   width=int(data["width"]), heads=int(data["heads"]))


class _Buffers(nn.Module):
    """Named constant tensors that travel with the state dict (the initialiser embeddings)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.detach().clone().float())

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, name)


class IDTokenGenerator(nn.Module):
    """initialiser embeddings -> per stage S, per encoder: one key vector and one value vector."""

    def __init__(self, config: GeneratorConfig, initializer: dict[str, torch.Tensor], seed: int = 0):
        super().__init__()
        if set(initializer) != set(config.encoders):
            raise IDTokensError(f"The initialiser word was embedded for text encoders {sorted(initializer)}, the "
                                f"token generator is set up for {sorted(config.encoders)}; use a CLIP of the same "
                                f"model family.")
        self.config = config
        names = sorted(config.encoders)
        self.initializer = _Buffers({n: initializer[n].reshape(-1, config.encoders[n]) for n in names})
        rng = torch.Generator().manual_seed(seed)
        width = config.width
        self.project_in = nn.ModuleDict({n: nn.Linear(config.encoders[n], width) for n in names})
        self.encoder_embedding = nn.Parameter(torch.randn(len(names), width, generator=rng) * 0.02)
        self.queries = nn.Parameter(torch.randn(2 * config.num_stages, width, generator=rng) * 0.02)
        self.block = nn.TransformerEncoderLayer(width, config.heads, dim_feedforward=2 * width, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(width)
        self.project_out = nn.ModuleDict({n: nn.Linear(width, config.encoders[n]) for n in names})
        # With Adam every weight moves by about lr per step; dividing the output by the width makes a
        # word vector move by about lr per step too, as when the vector itself is trained (textual
        # inversion), instead of width times faster.
        self.output_scale = 1.0 / width
        self._init_weights(rng)

    def _init_weights(self, rng: torch.Generator) -> None:
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name in ("encoder_embedding", "queries"):
                    continue
                if param.ndim >= 2:
                    # Small but non-zero: every parameter gets a gradient from the first step on, and
                    # the first vectors differ from the initialiser's by a few percent only.
                    std = 0.02 if name.startswith("project_out") else 1.0 / math.sqrt(param.shape[1])
                    param.copy_(torch.randn(param.shape, generator=rng) * std)
                elif "norm" in name and name.endswith("weight"):
                    param.fill_(1.0)
                else:
                    param.zero_()

    @property
    def encoder_names(self) -> list[str]:
        return sorted(self.config.encoders)

    def forward(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(keys, values): {encoder: (S, width_of_encoder)} each."""
        names = self.encoder_names
        words = [self.project_in[n](self.initializer[n]) + self.encoder_embedding[i] for i, n in enumerate(names)]
        sequence = torch.cat([*words, self.queries]).unsqueeze(0)
        hidden = self.norm(self.block(sequence)[0, -self.queries.shape[0]:])
        stages = self.config.num_stages
        keys, values = {}, {}
        for name in names:
            vectors = self.initializer[name].mean(0) + self.output_scale * self.project_out[name](hidden)
            keys[name], values[name] = vectors[:stages], vectors[stages:]
        return keys, values
