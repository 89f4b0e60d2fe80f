"""Infinite-ID's ID encoder: load it from an IDFuse file or an IP-Adapter FaceID checkpoint."""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.model_patcher
import torch

from ..models.encoders import load_id_encoder
from ..models.errors import IDEncoderError
from .glue.id_encoders import LoadedIDEncoder, encoder_choices, encoder_path

log = logging.getLogger("idfuse.nodes")

class IDFuseLoadIDEncoder:
    DESCRIPTION = ("Loads an Infinite-ID ID encoder: the face mapper (ArcFace embedding -> ID tokens), the CLIP "
                   "mapper if it has one, and the ID keys/values of every cross-attention layer. Reads IDFuse "
                   "encoders from models/idfuse/encoders and IP-Adapter FaceID, FaceID-Plus and FaceID-PlusV2 "
                   "checkpoints (SD1.5 and SDXL, .safetensors or .bin) from models/ipadapter, listed as "
                   "'ipadapter/...'. The kind and model family are recognised from the file's contents; a "
                   "FaceID-PlusV2 file must have 'plusv2' in its name (its weights look like FaceID-Plus). Each "
                   "encoder reads the face embeddings of one recogniser: the FaceID kinds insightface buffalo_l's, "
                   "IDFuse encoders the one named in their file; the Infinite-ID nodes refuse others.")
    CATEGORY = "IDFuse/Infinite-ID"
    RETURN_TYPES = ("ID_ENCODER",)
    RETURN_NAMES = ("id_encoder",)
    OUTPUT_TOOLTIPS = ("The ID encoder, its model family (SD1.5 / SDXL), kind and face embedding space; loaded to "
                       "the GPU (whole) when used.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "encoder_name": (encoder_choices(), {
                "tooltip": "An IDFuse encoder in models/idfuse/encoders, or an IP-Adapter FaceID / FaceID-Plus / "
                           "FaceID-PlusV2 checkpoint in models/ipadapter (shown as 'ipadapter/<file>'). Plus and "
                           "PlusV2 files have the same weights: PlusV2 is recognised by 'plusv2' in the name."}),
        }}

    def load(self, encoder_name: str) -> tuple[LoadedIDEncoder]:
        path = encoder_path(encoder_name)
        if path is None:
            raise IDEncoderError(f"ID encoder '{encoder_name}' not found in models/idfuse/encoders or "
                                 f"models/ipadapter; put the file there and refresh the page.")
        device = comfy.model_management.get_torch_device()
        dtype = torch.float16 if comfy.model_management.should_use_fp16(device) else torch.float32
        encoder = load_id_encoder(path, dtype=dtype)
        if note := encoder.encoder_kind.loaded_note(encoder):
            log.info("%s: %s", encoder_name, note)
        patcher = comfy.model_patcher.ModelPatcher(encoder, load_device=device,
                                                   offload_device=comfy.model_management.unet_offload_device())
        log.info("Loaded ID encoder %s: %s for %s, %d tokens, %d LoRA weights, face embeddings of %s", encoder_name,
                 encoder.encoder_kind.display_name, encoder.family, encoder.num_tokens, len(encoder.lora),
                 encoder.embedding_space)
        return (LoadedIDEncoder(patcher, encoder, encoder_name),)


NODE_CLASS_MAPPINGS = {"IDFuseLoadIDEncoder": IDFuseLoadIDEncoder}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFuseLoadIDEncoder": "IDFuse Load ID Encoder"}
