"""Infinite-ID inference: ID cross-attention and mixed self-attention with AdaIN, on two streams.

The two streams run in ONE batched UNet pass. Every chunk of ComfyUI's batch (one per
conditioning: positive, negative, areas...) holds ``2B`` rows: the text stream's ``B``
rows first, then the ID stream's ``B`` rows, each ID row paired with the text row ``B``
before it (same prompt, same noise at step 0).

- Text stream: the plain model. Its attention is never changed.
- ID stream: cross-attention output = Attn(Q, K_text, V_text) + w * Attn(Q, K_id, V_id),
  and self-attention is *mixed*: Attn(Q_id, [AdaIN(K_id, K_text); K_text],
  [AdaIN(V_id, V_text); V_text]) with the text stream's keys/values of the same layer,
  step and chunk.

Tensors follow ComfyUI's attention convention: (rows, tokens, heads * dim_head).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..errors import IDFuseInputError

Attention = Callable[..., torch.Tensor]  # optimized_attention(q, k, v, heads, ...)


def adain_mean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x - mean(x) + mean(y): means over tokens, per channel (the paper's choice)."""
    return x - x.mean(dim=-2, keepdim=True) + y.mean(dim=-2, keepdim=True)


def adain_full(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Classic AdaIN over tokens: matches std as well as mean (the paper reports it loses identity)."""
    mx, my = x.mean(dim=-2, keepdim=True), y.mean(dim=-2, keepdim=True)
    sx, sy = x.std(dim=-2, keepdim=True), y.std(dim=-2, keepdim=True)
    return (x - mx) / (sx + eps) * sy + my


def adain_off(x: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    return x


ADAIN_MODES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean": adain_mean, "full": adain_full, "off": adain_off,
}


def mixed_attention(q_id: torch.Tensor, k_id: torch.Tensor, v_id: torch.Tensor, k_text: torch.Tensor,
                    v_text: torch.Tensor, heads: int, attention: Attention, adain: str = "mean", **kwargs) -> torch.Tensor:
    """Attn(Q_id, [AdaIN(K_id, K_text); K_text], [AdaIN(V_id, V_text); V_text])."""
    shift = ADAIN_MODES[adain]
    keys = torch.cat([shift(k_id, k_text), k_text], dim=1)
    values = torch.cat([shift(v_id, v_text), v_text], dim=1)
    return attention(q_id, keys, values, heads, **kwargs)


def stream_views(t: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(text rows, ID rows) of a two-stream batch, each (chunks * B, ...)."""
    grouped = t.reshape(chunks, 2, t.shape[0] // (2 * chunks), *t.shape[1:])
    return grouped[:, 0].reshape(-1, *t.shape[1:]), grouped[:, 1].reshape(-1, *t.shape[1:])


def join_streams(text: torch.Tensor, ident: torch.Tensor, chunks: int) -> torch.Tensor:
    per = text.shape[0] // chunks
    stacked = torch.stack([text.reshape(chunks, per, *text.shape[1:]), ident.reshape(chunks, per, *ident.shape[1:])], 1)
    return stacked.reshape(-1, *text.shape[1:])


@dataclass
class SigmaWindow:
    start: float = float("inf")
    end: float = 0.0

    def contains(self, sigmas: torch.Tensor) -> bool:
        sigma = float(sigmas.reshape(-1)[0])
        return self.end <= sigma <= self.start


class MixedSelfAttention:
    """ComfyUI ``attn1_replace``: text rows attend normally, ID rows use mixed attention."""

    def __init__(self, attention: Attention, adain: str = "mean", window: SigmaWindow | None = None):
        if adain not in ADAIN_MODES:
            raise IDFuseInputError(f"adain {adain!r} is not one of {', '.join(ADAIN_MODES)}; pick one of those.")
        self.attention = attention
        self.adain = adain
        self.window = window or SigmaWindow()

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        kwargs = {"attn_precision": extra_options.get("attn_precision")}
        if not self.window.contains(extra_options["sigmas"]):
            return self.attention(q, k, v, heads, **kwargs)
        chunks = len(extra_options["cond_or_uncond"])
        q_text, q_id = stream_views(q, chunks)
        k_text, k_id = stream_views(k, chunks)
        v_text, v_id = stream_views(v, chunks)
        out_text = self.attention(q_text, k_text, v_text, heads, **kwargs)
        out_id = mixed_attention(q_id, k_id, v_id, k_text, v_text, heads, self.attention, self.adain, **kwargs)
        return join_streams(out_text, out_id, chunks)


@dataclass(frozen=True)
class IDKeysValues:
    """One layer's ID keys and values for positive rows and for negative rows: (1, T, C) each."""

    k_cond: torch.Tensor
    v_cond: torch.Tensor
    k_uncond: torch.Tensor
    v_uncond: torch.Tensor


class IDCrossAttention:
    """ComfyUI ``attn2_replace``: output = Attn(Q, K_t, V_t) + w * Attn(Q, K_id, V_id) on ID rows.

    With ``two_streams=False`` every row is an ID row (one stream, as IP-Adapter works).

    Positive chunks of the ID stream use the person's ID tokens, negative chunks the encoder's
    output for an empty face (as IP-Adapter does), so guidance pushes towards the identity.
    """

    def __init__(self, attention: Attention, layers: Mapping[tuple[str, int, int], IDKeysValues], weight: float,
                 window: SigmaWindow | None = None, two_streams: bool = True):
        self.attention = attention
        self.two_streams = two_streams
        self.layers = dict(layers)
        self.weight = float(weight)
        self.window = window or SigmaWindow()
        self._on_device: dict[tuple, IDKeysValues] = {}

    def __deepcopy__(self, memo):
        return self

    def _kv(self, key: tuple[str, int, int], like: torch.Tensor) -> IDKeysValues:
        cache_key = (key, like.device, like.dtype)
        found = self._on_device.get(cache_key)
        if found is None:
            layer = self.layers[key]
            found = IDKeysValues(*(t.to(like.device, like.dtype) for t in
                                   (layer.k_cond, layer.v_cond, layer.k_uncond, layer.v_uncond)))
            self._on_device[cache_key] = found
        return found

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        kwargs = {"attn_precision": extra_options.get("attn_precision")}
        out = self.attention(q, k, v, heads, **kwargs)
        if self.weight == 0.0 or not self.window.contains(extra_options["sigmas"]):
            return out
        key = (*extra_options["block"], extra_options["block_index"])
        layer = self._kv(key, q)
        cond_or_uncond = extra_options["cond_or_uncond"]
        chunks = len(cond_or_uncond)
        q_id = stream_views(q, chunks)[1] if self.two_streams else q
        per = q_id.shape[0] // chunks
        k_id = torch.cat([(layer.k_cond if c == 0 else layer.k_uncond).expand(per, -1, -1) for c in cond_or_uncond])
        v_id = torch.cat([(layer.v_cond if c == 0 else layer.v_uncond).expand(per, -1, -1) for c in cond_or_uncond])
        id_out = self.attention(q_id, k_id, v_id, heads, **kwargs)
        if not self.two_streams:
            return out + self.weight * id_out
        out_text, out_id = stream_views(out, chunks)
        return join_streams(out_text, out_id + self.weight * id_out, chunks)
