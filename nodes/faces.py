"""Infinite-ID face input: load a face backend (dlib built in, or insightface's models), embed the face of reference photos.

Thin ComfyUI glue over models/faces/. insightface and onnxruntime are imported only
when a node runs, so the pack loads without them.
"""

from __future__ import annotations

import folder_paths
import torch

from ..models.faces import as_face_backend, default_first, load_backend, providers
from ..models.faces.embed import COMBINE_MODES, FACE_CHOICES, NO_FACE_ACTIONS, embed_faces
from ..models.faces.insightface import DEFAULT_DET_SIZE
from ..models.faces.types import FaceBackend, FaceEmbedding
from .glue.clip_vision import clip_vision_penultimate, clip_vision_unconditional

CATEGORY = "IDFuse/Infinite-ID"


class IDFuseLoadFaceAnalysis:
    DESCRIPTION = ("Loads a face backend (detector, alignment, recogniser) for IDFuse Face Embed, Identity Score, Face "
                   "Masks and the trainer. dlib (public domain, built in): installed with the pack, nothing to "
                   "download; HOG (fast, frontal faces) or CNN (also turned faces, slow on CPU); 128-d embeddings "
                   "(dlib-resnet-128). insightface packs (buffalo_l, antelopev2; their weights are licensed for "
                   "non-commercial research only) from ComfyUI/models/insightface/models/<name>/ with `pip install "
                   "insightface onnxruntime` (or onnxruntime-gpu). IP-Adapter FaceID, FaceID-Plus and FaceID-PlusV2 "
                   "need buffalo_l (they were trained on its w600k_r50 embeddings; the Infinite-ID nodes refuse "
                   "embeddings of another recogniser). Nothing is downloaded: missing files are an error saying where "
                   "to put them.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FACE_ANALYSIS",)
    RETURN_NAMES = ("face_analysis",)
    OUTPUT_TOOLTIPS = ("The face backend: the chosen detector and recogniser (for IDFuse Face Embed, Identity Score, "
                       "Face Masks and Train Identity).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            # buffalo_l first: ComfyUI preselects a combo's first choice.
            # Preselected (the first choice): buffalo_l when it is installed, else the built-in dlib HOG.
            "model_name": (default_first(folder_paths.get_folder_paths), {
                "tooltip": "dlib HOG: fast on CPU, frontal and near-frontal faces. dlib CNN: also turned faces, about "
                           "2-3 s per photo on CPU at det_size 640. insightface packs: in "
                           "models/insightface/models/<name>/ (or a folder listed under 'insightface' in "
                           "extra_model_paths.yaml). IP-Adapter FaceID / FaceID-Plus / PlusV2 need buffalo_l "
                           "(trained on its w600k_r50 embeddings); antelopev2 (glintr100 recogniser) is what "
                           "InstantID/PuLID use, and its embeddings do not fit the FaceID encoders; dlib's fit "
                           "IDFuse encoders trained on them."}),
            "provider": (providers(), {
                "tooltip": "Where the face models run. insightface: CUDA appears only with onnxruntime-gpu installed "
                           "(instead of onnxruntime, not next to it). dlib: CPU; CUDA only for a dlib built with CUDA "
                           "(the dlib-bin wheels are CPU-only)."}),
            "det_size": ("INT", {
                "default": DEFAULT_DET_SIZE, "min": 160, "max": 2048, "step": 32,
                "tooltip": "Side of the square the detector sees the photo at. 640 suits most photos; when no face "
                           "is found, IDFuse Face Embed also tries smaller sizes (512, 384, 256, 160). dlib: the photo "
                           "is scaled so that its longer side is det_size; raise it for small faces in group photos "
                           "(the CNN's time grows with its square)."}),
        }}

    def load(self, model_name: str, provider: str, det_size: int) -> tuple[FaceBackend]:
        return (load_backend(model_name, folder_paths.get_folder_paths, provider, det_size),)


class IDFuseFaceEmbed:
    DESCRIPTION = ("Finds the face in each reference photo (with the connected face backend: dlib or insightface), "
                   "aligns it and turns it into the identity embedding for the Infinite-ID encoder: the face "
                   "embedding (ArcFace or dlib's, combined over all photos) and, with "
                   "a CLIP vision model connected, CLIP features of the aligned face crop. The preview shows the "
                   "detected faces (the one used in green) and their keypoints.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ID_EMBEDS", "IMAGE")
    RETURN_NAMES = ("id_embeds", "preview")
    OUTPUT_TOOLTIPS = (
        "The identity: the face embedding combined over the photos (ArcFace: [1, 512]) and which recogniser "
        "made it, CLIP hidden states of the face [1, 257, 1280] and of the unconditional image (the encoder's "
        "negative) when clip_vision is connected, and the per-photo embeddings.",
        "The photos with every detected face box (the one used in green, with its index) and five keypoints; "
        "photos without a face get a red frame.",
    )
    FUNCTION = "embed"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {
                    "tooltip": "One or more photos of the same person (a batch). Grey, RGBA and small photos work; "
                               "a clear, frontal face gives the best identity."}),
                "face_analysis": ("FACE_ANALYSIS", {"tooltip": "From IDFuse Load Face Analysis."}),
                "face_choice": (list(FACE_CHOICES), {
                    "tooltip": "Which face to use when a photo has several: the largest, or the one at face_index."}),
                "face_index": ("INT", {
                    "default": 0, "min": 0, "max": 63,
                    "tooltip": "With face_choice 'index': which face, counted from 0 left to right (the preview "
                               "labels them)."}),
                "combine": (list(COMBINE_MODES), {
                    "tooltip": "How several photos become one identity: the mean of their unit-length ArcFace "
                               "embeddings, rescaled to unit length ('normalized mean', like a single photo's), or "
                               "the plain mean. CLIP features are always averaged."}),
                "on_no_face": (list(NO_FACE_ACTIONS), {
                    "tooltip": "A photo without a detectable face: stop with an error naming it, or skip it "
                               "(an error still if no photo has a face)."}),
            },
            "optional": {
                "clip_vision": ("CLIP_VISION", {
                    "tooltip": "CLIP vision model (ViT-H/14) for encoders that also use CLIP features of the face "
                               "(IP-Adapter FaceID-Plus/PlusV2, IDFuse encoders with a CLIP mapper). It also encodes "
                               "the unconditional image once (CLIP's mean grey, as the reference), which those "
                               "encoders use for the negative."}),
            },
        }

    def embed(self, image: torch.Tensor, face_analysis, face_choice: str, face_index: int, combine: str,
              on_no_face: str, clip_vision=None) -> tuple[FaceEmbedding, torch.Tensor]:
        encoder = unconditional = None
        if clip_vision is not None:
            def encoder(crops: torch.Tensor) -> torch.Tensor:
                return clip_vision_penultimate(clip_vision, crops)

            def unconditional() -> torch.Tensor:
                return clip_vision_unconditional(clip_vision)
        embedding, preview = embed_faces(as_face_backend(face_analysis), image, face_choice=face_choice,
                                         face_index=face_index, combine=combine, on_no_face=on_no_face,
                                         clip_encoder=encoder, clip_unconditional=unconditional)
        return (embedding, preview)


NODE_CLASS_MAPPINGS = {
    "IDFuseLoadFaceAnalysis": IDFuseLoadFaceAnalysis,
    "IDFuseFaceEmbed": IDFuseFaceEmbed,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IDFuseLoadFaceAnalysis": "IDFuse Load Face Analysis",
    "IDFuseFaceEmbed": "IDFuse Face Embed",
}
