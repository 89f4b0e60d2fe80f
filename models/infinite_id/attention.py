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

Several identities in one picture (``RegionMasks``): the same single ID stream; each identity's ID
cross-attention term is weighted by its mask on the layer's token grid, and the AdaIN statistics of
mixed self-attention are taken per region (each identity's region and the background). See
docs/METHOD.md, "Several people in one picture".

Tensors follow ComfyUI's attention convention: (rows, tokens, heads * dim_head).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import IDFuseInputError
from ..unet import layer_grid, masks_on_grid

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
                    v_text: torch.Tensor, heads: int, attention: Attention, adain: str = "mean",
                    regions: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Attn(Q_id, [AdaIN(K_id, K_text); K_text], [AdaIN(V_id, V_text); V_text]); with ``regions`` (R, n) the
    AdaIN statistics are per region (``regional_adain``)."""
    if regions is None:
        shift = ADAIN_MODES[adain]
    else:
        def shift(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return regional_adain(x, y, regions, adain)
    keys = torch.cat([shift(k_id, k_text), k_text], dim=1)
    values = torch.cat([shift(v_id, v_text), v_text], dim=1)
    return attention(q_id, keys, values, heads, **kwargs)


# The grid factors of SD1.5 / SDXL layers, tried in turn to find the grid of a layer's token count.
GRID_DOWNSCALES = (1, 2, 4, 8, 16)


class RegionMasks:
    """Where each of N identities acts: masks (N, H, W) in [0, 1] over the whole picture (stretched to it).

    ``on_grid`` gives each mask's share of every token of a layer (area average, ``masks_on_grid``), cached
    per grid, device and dtype. ``adain_weights`` turns them into the regions of regional AdaIN.
    """

    def __init__(self, masks: torch.Tensor):
        if masks.ndim != 3 or not len(masks):
            raise IDFuseInputError(f"Region masks must be (identities, height, width), got {tuple(masks.shape)}.")
        self.masks = masks.detach().float().clamp(0.0, 1.0).cpu()
        self._on_grid: dict[tuple, torch.Tensor] = {}
        self._adain: dict[tuple, torch.Tensor | None] = {}

    def __deepcopy__(self, memo):
        return self

    def __len__(self) -> int:
        return len(self.masks)

    @staticmethod
    def grid(tokens: int, latent_hw: Sequence[int]) -> tuple[int, int]:
        for downscale in GRID_DOWNSCALES:
            height, width = layer_grid(latent_hw, downscale)
            if height * width == tokens:
                return height, width
        raise IDFuseInputError(f"A layer of {tokens} tokens is no grid of the {tuple(latent_hw)} latent: regional "
                               f"Infinite-ID needs a plain SD1.5 or SDXL UNet.")

    def on_grid(self, tokens: int, latent_hw: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """(N, tokens): each identity's share of every token of the layer."""
        cache_key = (tokens, tuple(latent_hw), like.device, like.dtype)
        found = self._on_grid.get(cache_key)
        if found is None:
            found = masks_on_grid(self.masks, self.grid(tokens, latent_hw)).to(like.device, like.dtype)
            self._on_grid[cache_key] = found
        return found

    def adain_weights(self, tokens: int, latent_hw: Sequence[int], like: torch.Tensor) -> torch.Tensor | None:
        """(R, tokens) regions of regional AdaIN, summing to 1 at every token: each identity's mask (divided by
        their sum where masks overlap beyond 1), then the background (what is left); empty regions dropped.
        None when one region covers everything (plain AdaIN)."""
        cache_key = (tokens, tuple(latent_hw), like.device, like.dtype)
        if cache_key not in self._adain:
            shares = masks_on_grid(self.masks, self.grid(tokens, latent_hw)).double()
            shares = shares / shares.sum(0).clamp(min=1.0)
            regions = torch.cat([shares, (1.0 - shares.sum(0)).clamp(min=0.0)[None]])
            regions = regions[regions.sum(1) > 0]
            whole = len(regions) == 1 and bool((regions == 1).all())
            self._adain[cache_key] = None if whole else regions.to(like.device, like.dtype)
        return self._adain[cache_key]


def regional_adain(x: torch.Tensor, y: torch.Tensor, regions: torch.Tensor, adain: str, eps: float = 1e-5
                   ) -> torch.Tensor:
    """AdaIN with statistics per region: sum_r regions[r, p] * AdaIN_r(x, y)[p], where AdaIN_r takes the means
    (and for ``full`` the standard deviations) over tokens weighted by region r. x, y: (B, n, C); regions:
    (R, n) summing to 1 at every token. With one region of weight 1 it is ``ADAIN_MODES[adain]`` (up to rounding
    and, for ``full``, the population rather than the sample deviation)."""
    if adain == "off":
        return x
    total = regions.sum(1)[None, :, None]  # (1, R, 1)

    def mean(t: torch.Tensor) -> torch.Tensor:  # (B, R, C)
        return torch.einsum("rn,bnc->brc", regions, t) / total

    mx, my = mean(x), mean(y)
    if adain == "mean":
        return x + torch.einsum("rn,brc->bnc", regions, my - mx)
    if adain == "full":
        sx = (torch.einsum("rn,bnc->brc", regions, x.square()) / total - mx.square()).clamp(min=0).sqrt()
        sy = (torch.einsum("rn,bnc->brc", regions, y.square()) / total - my.square()).clamp(min=0).sqrt()
        scale = sy / (sx + eps)
        return (torch.einsum("rn,brc->bnc", regions, scale) * x
                + torch.einsum("rn,brc->bnc", regions, my - mx * scale))
    raise IDFuseInputError(f"adain {adain!r} is not one of {', '.join(ADAIN_MODES)}; pick one of those.")


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
    """ComfyUI ``attn1_replace``: text rows attend normally, ID rows use mixed attention.

    With ``masks`` (several identities, or one in part of the picture) the AdaIN statistics are taken per
    region: each identity's region and the background.
    """

    def __init__(self, attention: Attention, adain: str = "mean", window: SigmaWindow | None = None,
                 masks: RegionMasks | None = None):
        if adain not in ADAIN_MODES:
            raise IDFuseInputError(f"adain {adain!r} is not one of {', '.join(ADAIN_MODES)}; pick one of those.")
        self.attention = attention
        self.adain = adain
        self.window = window or SigmaWindow()
        self.masks = masks

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
        regions = None
        if self.masks is not None:
            regions = self.masks.adain_weights(q.shape[1], extra_options["original_shape"][-2:], q)
        out_id = mixed_attention(q_id, k_id, v_id, k_text, v_text, heads, self.attention, self.adain, regions,
                                 **kwargs)
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

    Several identities: ``layers`` is a sequence of per-layer mappings (one per identity) and ``masks`` their
    ``RegionMasks``; then output = Attn(Q, K_t, V_t) + w * sum_i m_i * Attn(Q, K_i, V_i), m_i identity i's
    share of each token, so where every m_i is 0 the output is the text cross-attention's, bit for bit.
    """

    def __init__(self, attention: Attention,
                 layers: Mapping[tuple[str, int, int], IDKeysValues] | Sequence[Mapping[tuple[str, int, int],
                                                                                         IDKeysValues]],
                 weight: float, window: SigmaWindow | None = None, two_streams: bool = True,
                 masks: RegionMasks | None = None):
        identities = (dict(layers),) if isinstance(layers, Mapping) else tuple(dict(one) for one in layers)
        if masks is not None and len(masks) != len(identities):
            raise IDFuseInputError(f"{len(identities)} identities but {len(masks)} region masks: give one mask per "
                                   f"identity.")
        if masks is None and len(identities) != 1:
            raise IDFuseInputError(f"{len(identities)} identities without region masks: give one mask per identity.")
        self.attention = attention
        self.two_streams = two_streams
        self.identities = identities
        self.layers = identities[0]
        self.masks = masks
        self.weight = float(weight)
        self.window = window or SigmaWindow()
        self._on_device: dict[tuple, tuple[IDKeysValues, ...]] = {}

    def __deepcopy__(self, memo):
        return self

    def _kv(self, key: tuple[str, int, int], like: torch.Tensor) -> tuple[IDKeysValues, ...]:
        cache_key = (key, like.device, like.dtype)
        found = self._on_device.get(cache_key)
        if found is None:
            found = tuple(IDKeysValues(*(t.to(like.device, like.dtype) for t in
                                         (layer.k_cond, layer.v_cond, layer.k_uncond, layer.v_uncond)))
                          for layer in (identity[key] for identity in self.identities))
            self._on_device[cache_key] = found
        return found

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        kwargs = {"attn_precision": extra_options.get("attn_precision")}
        out = self.attention(q, k, v, heads, **kwargs)
        if self.weight == 0.0 or not self.window.contains(extra_options["sigmas"]):
            return out
        key = (*extra_options["block"], extra_options["block_index"])
        cond_or_uncond = extra_options["cond_or_uncond"]
        chunks = len(cond_or_uncond)
        q_id = stream_views(q, chunks)[1] if self.two_streams else q
        per = q_id.shape[0] // chunks
        shares = None
        if self.masks is not None:
            shares = self.masks.on_grid(q.shape[1], extra_options["original_shape"][-2:], q)
        id_out = None
        for index, layer in enumerate(self._kv(key, q)):
            k_id = torch.cat([(layer.k_cond if c == 0 else layer.k_uncond).expand(per, -1, -1)
                              for c in cond_or_uncond])
            v_id = torch.cat([(layer.v_cond if c == 0 else layer.v_uncond).expand(per, -1, -1)
                              for c in cond_or_uncond])
            term = self.attention(q_id, k_id, v_id, heads, **kwargs)
            if shares is not None:
                term = term * shares[index][None, :, None]
            id_out = term if id_out is None else id_out + term
        if not self.two_streams:
            return out + self.weight * id_out
        out_text, out_id = stream_views(out, chunks)
        return join_streams(out_text, out_id + self.weight * id_out, chunks)
