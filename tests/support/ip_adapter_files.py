"""Synthetic IP-Adapter checkpoints with the released files' key names and shapes, for tests.

Names and shapes follow tencent-ailab/IP-Adapter (ip_adapter_faceid.py: MLPProjModel,
ProjPlusModel / FacePerceiverResampler; attention_processor_faceid.py: LoRAAttnProcessor,
LoRAIPAttnProcessor) as released in h94/IP-Adapter-FaceID. C = context width (768 / 2048):

image_proj
    proj.0 (1024, 512) + bias, proj.2 (4*C, 1024) + bias, norm (C)               all FaceID kinds
    perceiver_resampler.proj_in (C, 1280), proj_out (C, C), norm_out (C),        Plus and PlusV2
        layers.i.0.{norm1, norm2 (C), to_q (C, C), to_kv (2C, C), to_out (C, C)},
        layers.i.1.{0: LayerNorm (C), 1: (4C, C), 3: (C, 4C)}, i < 4 (C/64 heads of 64)
ip_adapter, per attention processor N in diffusers' order (models/encoders/processor_order.py), width h
    N.to_{q,k,v,out}_lora.down.weight (r, in), .up.weight (h, r); r = 128, in = C for an
        attn2's to_k / to_v, else h                                               every processor
    N.to_k_ip.weight, N.to_v_ip.weight (h, C)                                     attn2 only

Plus and PlusV2 files are the same; the name tells them apart. Layouts, from the suffix:
``.bin`` = torch.save of {"image_proj": {...}, "ip_adapter": {...}} as released;
``.safetensors`` = the same flattened to "image_proj.<key>" / "ip_adapter.<key>".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from comfyui_idfuse.models.encoders.processor_order import processors
from comfyui_idfuse.models.unet import CONTEXT_DIM


@dataclass(frozen=True)
class Widths:
    unet_divisor: int = 1  # the UNet's channel widths are the real ones divided by this
    lora_rank: int = 128
    face_hidden: int = 1024
    resampler_depth: int = 4
    resampler_inner: int | None = None  # attention width; None = C, as released
    resampler_ff: int | None = None  # feed-forward width; None = 4 * C, as released


# The released shapes, in fp16 97 MB (FaceID SD1.5), 157 MB (Plus SD1.5), 1.07 GB (FaceID SDXL),
# 1.49 GB (PlusV2 SDXL): build them on the meta device.
REAL = Widths()
# Every key of a real file and the context widths that tell the families apart (768 / 2048), with
# narrow UNet layers, mappers and LoRA: 2-40 MB in fp16.
SMALL = Widths(unet_divisor=40, lora_rank=4, face_hidden=64, resampler_depth=2, resampler_inner=64, resampler_ff=128)
# SMALL with the layer widths of the small UNets of tests/support/factories.py (real / 10), to patch those models.
FITS_TEST_UNETS = replace(SMALL, unet_divisor=10)

NUM_FACE_TOKENS = 4


def _shapes_image_proj(kind: str, context: int, widths: Widths) -> dict[str, tuple[int, ...]]:
    shapes = {
        "proj.0.weight": (widths.face_hidden, 512), "proj.0.bias": (widths.face_hidden,),
        "proj.2.weight": (NUM_FACE_TOKENS * context, widths.face_hidden), "proj.2.bias": (NUM_FACE_TOKENS * context,),
        "norm.weight": (context,), "norm.bias": (context,),
    }
    if kind == "faceid":
        return shapes
    inner, ff = widths.resampler_inner or context, widths.resampler_ff or 4 * context
    resampler = {
        "proj_in.weight": (context, 1280), "proj_in.bias": (context,),
        "proj_out.weight": (context, context), "proj_out.bias": (context,),
        "norm_out.weight": (context,), "norm_out.bias": (context,),
    }
    for i in range(widths.resampler_depth):
        resampler.update({
            f"layers.{i}.0.norm1.weight": (context,), f"layers.{i}.0.norm1.bias": (context,),
            f"layers.{i}.0.norm2.weight": (context,), f"layers.{i}.0.norm2.bias": (context,),
            f"layers.{i}.0.to_q.weight": (inner, context), f"layers.{i}.0.to_kv.weight": (2 * inner, context),
            f"layers.{i}.0.to_out.weight": (context, inner),
            f"layers.{i}.1.0.weight": (context,), f"layers.{i}.1.0.bias": (context,),
            f"layers.{i}.1.1.weight": (ff, context), f"layers.{i}.1.3.weight": (context, ff),
        })
    shapes.update({f"perceiver_resampler.{k}": s for k, s in resampler.items()})
    return shapes


def _shapes_ip_adapter(family: str, widths: Widths, lora: bool) -> dict[str, tuple[int, ...]]:
    context, rank = CONTEXT_DIM[family], widths.lora_rank
    shapes = {}
    for p in processors(family):
        h = p.hidden_size // widths.unet_divisor
        if lora:
            for name in ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"):
                width_in = context if p.is_cross_attention and name in ("to_k_lora", "to_v_lora") else h
                shapes[f"{p.number}.{name}.down.weight"] = (rank, width_in)
                shapes[f"{p.number}.{name}.up.weight"] = (h, rank)
        if p.is_cross_attention:
            shapes[f"{p.number}.to_k_ip.weight"] = (h, context)
            shapes[f"{p.number}.to_v_ip.weight"] = (h, context)
    return shapes


def _tensors(shapes: dict[str, tuple[int, ...]], gen: torch.Generator | None, dtype: torch.dtype,
             device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random, well-scaled values; zeros when gen is None (fast, or on the meta device, for shape tests)."""
    out = {}
    for name, shape in shapes.items():
        if gen is None:
            out[name] = torch.zeros(shape, dtype=dtype, device=device)
            continue
        value = torch.randn(shape, generator=gen)
        if len(shape) == 2:
            value /= math.sqrt(shape[1])
        else:
            value = value * 0.02 + (1.0 if name.endswith("weight") else 0.0)  # LayerNorm scales near 1
        out[name] = value.to(dtype)
    return out


def faceid_checkpoint(kind: str, family: str, widths: Widths = SMALL, seed: int | None = 0,
                      dtype: torch.dtype = torch.float16, lora: bool = True,
                      device: str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} of a FaceID (kind "faceid") or FaceID-Plus(V2) checkpoint.

    fp16 like the released files; ``seed=None`` gives zeros (needed for ``device="meta"``).
    """
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    image_kind = "faceid" if kind == "faceid" else "faceid_plus"
    return {
        "image_proj": _tensors(_shapes_image_proj(image_kind, CONTEXT_DIM[family], widths), gen, dtype, device),
        "ip_adapter": _tensors(_shapes_ip_adapter(family, widths, lora), gen, dtype, device),
    }


def image_ip_adapter_checkpoint(family: str, widths: Widths = SMALL) -> dict[str, dict[str, torch.Tensor]]:
    """A plain (non-FaceID) IP-Adapter: ImageProjModel of a 1024-wide CLIP image embedding, no LoRA."""
    context = CONTEXT_DIM[family]
    gen = torch.Generator().manual_seed(0)
    image_proj = {"proj.weight": (4 * context, 1024), "proj.bias": (4 * context,), "norm.weight": (context,),
                  "norm.bias": (context,)}
    return {"image_proj": _tensors(image_proj, gen, torch.float32),
            "ip_adapter": _tensors(_shapes_ip_adapter(family, widths, lora=False), gen, torch.float32)}


def flatten(checkpoint: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{part}.{key}": t for part, tensors in checkpoint.items() for key, t in tensors.items()}


def save_checkpoint(checkpoint: dict[str, dict[str, torch.Tensor]], path: str | Path) -> Path:
    """Write in the layout of the suffix: .safetensors flattened, anything else torch.save'd nested."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: t.contiguous() for k, t in flatten(checkpoint).items()}, str(path))
    else:
        torch.save(checkpoint, path)
    return path


def write_faceid(path: str | Path, kind: str, family: str, widths: Widths = SMALL, seed: int | None = 0,
                 dtype: torch.dtype = torch.float16, lora: bool = True) -> Path:
    return save_checkpoint(faceid_checkpoint(kind, family, widths, seed, dtype, lora), path)


def random_clip_vision(seed: int = 0, layers: int = 2):
    """ComfyUI's CLIP vision model (comfy.clip_vision.ClipVisionModel) of ViT-H/14's input and widths (224 px,
    patch 14: 257 tokens of 1280) with ``layers`` narrow-MLP layers and random weights: what FaceID-Plus reads
    (penultimate hidden states [K, 257, 1280]), built the way ComfyUI builds it."""
    import json
    import tempfile

    import comfy.clip_vision
    from factories import init_weights

    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1280, "image_size": 224,
              "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 256,
              "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 16,
              "num_channels": 3, "num_hidden_layers": layers, "patch_size": 14, "projection_dim": 64}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(config, file)
    model = comfy.clip_vision.ClipVisionModel(file.name)
    Path(file.name).unlink()
    init_weights(model.model, seed)
    return model
