"""Small models of the real topologies, built with ComfyUI's own classes, on the CPU.

UNets keep SD1.5's / SDXL's block layout (every cross-attention layer at its real place,
real context widths) with few channels. Text encoders keep the real tokenizer and
embedding widths (768 / 1280) with two narrow layers.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path

import torch

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_linear_in_transformer": True, "context_dim": 2048, "num_heads": -1, "num_head_channels": 16,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": 2816, "num_classes": "sequential",
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's layers skip initialisation; give every weight a deterministic, well-scaled value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1:
                is_norm_weight = name.endswith("weight")
                param.copy_(torch.ones_like(param) if is_norm_weight else torch.randn(param.shape, generator=gen) * 0.02)
            else:
                fan_in = math.prod(param.shape[1:])
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))


def make_model(family: str = "sd15", prediction: str = "eps", seed: int = 0, dtype: torch.dtype = torch.float32,
               **overrides):
    """A ModelPatcher around a small UNet of the family's topology, like a loaded checkpoint (weights
    in ``dtype``, as ComfyUI loads them: float16 on most GPUs)."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    config_class = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[family]
    unet_config = dict(SD15_UNET if family == "sd15" else SDXL_UNET, **overrides)
    model_config = config_class(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model_type = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION}[prediction]
    model_class = comfy.model_base.SDXL if family == "sdxl" else comfy.model_base.BaseModel
    model = model_class(model_config, model_type=model_type, device="cpu")
    init_weights(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _tiny_text_config(width: int, tmp: Path) -> str:
    config = {
        "hidden_act": "quick_gelu" if width == 768 else "gelu", "hidden_size": width, "intermediate_size": 128,
        "num_attention_heads": 4, "num_hidden_layers": 3, "max_position_embeddings": 77, "vocab_size": 49408,
        "projection_dim": width, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 49407,
        "pad_token_id": 1, "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
        "initializer_range": 0.02, "model_type": "clip_text_model",
    }
    path = tmp / f"tiny_clip_{width}.json"
    path.write_text(json.dumps(config))
    return str(path)


def tiny_vae(seed: int = 3):
    """A ComfyUI VAE (AutoencoderKL, factor 8) with 32 channels and one block per level."""
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": ddconfig}})
    init_weights(vae.first_stage_model, seed)
    return vae


def make_clip(family: str, tokenizer_dir: Path, seed: int = 0):
    """A ComfyUI CLIP object with the family's tokenizers and text-encoder widths (2 narrow layers)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip

    # The text encoders read their JSON configs while CLIP is built; the folder is not needed after.
    with tempfile.TemporaryDirectory(prefix="idfuse-clip-") as tmp_name:
        tmp = Path(tmp_name)
        l_tokenizer = functools.partial(comfy.sd1_clip.SDTokenizer, tokenizer_path=str(tokenizer_dir))
        clip_l = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=_tiny_text_config(768, tmp))
        target_params: dict = {}

        if family == "sd15":
            target_clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=clip_l)
            target_tokenizer = functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=l_tokenizer)
        else:
            g_config = _tiny_text_config(1280, tmp)

            class TinySDXLClip(comfy.sdxl_clip.SDXLClipModel):
                def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's signature)
                    torch.nn.Module.__init__(self)
                    self.clip_l = clip_l(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                         layer_norm_hidden_state=False, model_options=model_options)
                    self.clip_g = comfy.sd1_clip.SDClipModel(
                        device=device, dtype=dtype, layer="hidden", layer_idx=-2, textmodel_json_config=g_config,
                        special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                        return_projected_pooled=True, model_options=model_options)
                    self.dtypes = {dtype}

            class TinySDXLTokenizer(comfy.sdxl_clip.SDXLTokenizer):
                def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006
                    self.clip_l = l_tokenizer(embedding_directory=embedding_directory)
                    self.clip_g = comfy.sd1_clip.SDTokenizer(
                        str(tokenizer_dir), pad_with_end=False, embedding_directory=embedding_directory,
                        embedding_size=1280, embedding_key="clip_g")

            target_clip, target_tokenizer = TinySDXLClip, TinySDXLTokenizer

        class Target:
            params = target_params
            clip = target_clip
            tokenizer = target_tokenizer

        clip = comfy.sd.CLIP(Target, embedding_directory=None, model_options={"dtype": torch.float32})
    init_weights(clip.cond_stage_model, seed)
    return clip


def make_id_tokens(family: str = "sd15", num_stages: int = 5, placeholder: str = "sks",
                   initializer: str = "person", seed: int = 0, scale: float = 1.0):
    """Random identity tokens in the pack's format (the trainer makes real ones)."""
    from comfyui_idfuse.models.tokens.format import ENCODERS, IDTokens

    gen = torch.Generator().manual_seed(seed)
    widths = ENCODERS[family]
    return IDTokens(
        family=family, placeholder=placeholder, initializer=initializer,
        keys={n: torch.randn(num_stages, w, generator=gen) * scale for n, w in widths.items()},
        values={n: torch.randn(num_stages, w, generator=gen) * scale for n, w in widths.items()},
        training={"method": "random, for tests"}, source="test-tokens",
    )


def random_stage_contexts(family: str = "sd15", num_stages: int = 5, length: int = 77, seed: int = 0):
    """Per-stage contexts with a distinct, recognisable tensor per stage and kind."""
    from comfyui_idfuse.models.tokens.patch import StageContexts
    from comfyui_idfuse.models.unet import CONTEXT_DIM

    gen = torch.Generator().manual_seed(seed)
    width = CONTEXT_DIM[family]
    return StageContexts(
        family=family, placeholder="sks",
        plain=torch.randn(1, length, width, generator=gen),
        keys=torch.randn(num_stages, length, width, generator=gen),
        values=torch.randn(num_stages, length, width, generator=gen),
    )


def sdxl_extras(cond: torch.Tensor) -> dict:
    return {"pooled_output": torch.zeros(cond.shape[0], 1280)} if cond.shape[-1] == 2048 else {}


def sample(model, positive, negative, steps: int = 3, cfg: float = 4.0, seed: int = 0, size: int = 16,
           batch: int = 1, sigmas: torch.Tensor | None = None):
    """Sample with ComfyUI's own sampling entry points; conditionings in ComfyUI's list format."""
    import comfy.sample
    import comfy.samplers

    noise = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))
    latent = torch.zeros_like(noise)
    with torch.inference_mode():
        if sigmas is None:
            return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                       disable_pbar=True, seed=seed)
        return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas,
                                          positive, negative, latent, disable_pbar=True, seed=seed)


def random_id_layers(model, family, tokens=4, seed=0):
    """Random ID keys/values (positive and negative) of the right width for every cross-attention layer."""
    from comfyui_idfuse.models.infinite_id.attention import IDKeysValues
    from comfyui_idfuse.nodes.glue.model_info import cross_attention_widths

    gen = torch.Generator().manual_seed(seed)
    return {key: IDKeysValues(*(torch.randn(1, tokens, width, generator=gen) for _ in range(4)))
            for key, width in cross_attention_widths(model).items()}
