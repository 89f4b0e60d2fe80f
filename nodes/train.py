"""IDFuse Train Identity (with IDFuse Training Options): learn SeFi-IDE identity tokens, and
optionally a LoRA, from a few photos; IDFuse Face Masks, the masks it trains with.

The ComfyUI side of models/training/: photos (or a photo folder) and masks in, the frozen MODEL/CLIP/VAE
turned into the trainer's ``encode`` and ``denoise``, model management, progress, sample images,
interrupts, files.
"""

from __future__ import annotations

import logging

import folder_paths
import torch

from ..models.tokens.generator import GeneratorConfig
from ..models.training.losses import ATTENTION_MODES
from ..models.training.photos import AUGMENTATIONS
from ..models.training.settings import DEFAULT_SAVE_NAME, DEFAULTS, LR_SCHEDULES, TRAINING_DTYPES, TrainingSettings
from .glue.folders import ID_TOKENS_FOLDER
from .glue.lora_files import LORA_TARGET_CHOICES
from .glue.training_files import (
    NO_RESUME,
    SAVE_NAME_RULE,
)
from .glue.training_masks import face_masks, mask_preview
from .glue.training_options import (
    LOSS_LAYER_CHOICES,
    available_optimizers,
    boolean_input,
    check_generator_width,
    check_optimizer,
    choice_input,
    number_input,
    parse_lora_targets,
    parse_loss_layers,
    parse_sample_prompts,
    parse_templates,
    text_input,
)
from .glue.training_run import TrainingRun

log = logging.getLogger("idfuse.nodes")

CATEGORY = "IDFuse/training"
OPTIONS_TYPE = "IDFUSE_TRAINING_OPTIONS"
PHOTOS_TYPE = "IDFUSE_TRAINING_PHOTOS"


# --- the nodes --------------------------------------------------------------------------------


class IDFuseTrainIdentity:
    DESCRIPTION = ("Learns an identity from 1-10 photos of a person: SeFi-IDE's per-stage key/value word vectors "
                   "(made by a small trainable attention block over the initialiser word), optionally with a LoRA "
                   "on the UNet's cross-attention. The placeholder's cross-attention is kept on the face by an "
                   "attention loss, so scenes, actions and styles in a prompt still work. Stop any time (the last "
                   "step is saved) and resume later. Photos: images, or a folder with captions from IDFuse Load "
                   "Training Photos (training_photos). Further settings (optimiser, sample images every N steps, "
                   "validation loss, ...): connect IDFuse Training Options. Files: "
                   "models/idfuse/tokens/<save_name>.safetensors (+ .trainstate, .report.json, .samples/) and "
                   "models/loras/<save_name>.safetensors.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ID_TOKENS", "MODEL", "STRING", "IMAGE", "IMAGE", "STRING", "IMAGE")
    RETURN_NAMES = ("id_tokens", "model", "files", "loss_curve", "attention_maps", "report", "samples")
    OUTPUT_TOOLTIPS = (
        "The learned identity; connect to IDFuse Encode With ID.",
        "The input model with the trained LoRA applied (the input model itself when lora_rank is 0).",
        "The files written, one path per line.",
        "Diffusion and attention loss per step.",
        "Per photo: the photo, then the placeholder's attention at the loss layers before and after training, "
        "with the share inside the face mask.",
        "Settings, steps, final losses and the face-attention share before/after (also saved as JSON).",
        "Sample images (Training Options' sample_prompts) as one grid: a row per prompt, a column per sampling "
        "round, so you see when the identity appears and when it starts to override the prompt.",
    )
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        tokens = folder_paths.get_filename_list(ID_TOKENS_FOLDER)
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD1.5 or SDXL model to learn the identity for (stays frozen)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder (stays frozen)."}),
            "vae": ("VAE", {"tooltip": "Its VAE, to encode the photos."}),
            "placeholder": text_input("placeholder", "The new word for the person; must be one token (rare words "
                                                     "such as 'sks' are)."),
            "initializer": text_input("initializer", "A one-token word the identity starts from and that the "
                                                     "reference prompt uses."),
            "steps": number_input("steps", "Total optimiser steps (ProSpect's ~600). When resuming, training "
                                           "continues up to this number."),
            "learning_rate": number_input("learning_rate", (
                "Learning rate (ProSpect's 1e-4 with AdamW). With the Prodigy optimiser (Training Options) set 1.0: "
                "Prodigy finds the step size itself and this only scales it."), round=False),
            "attention_weight": number_input("attention_weight", (
                "λ in loss = diffusion + λ·attention. 0.003 is the paper's choice: 1e-4 lets the token take over "
                "the image, ≥ 0.01 loses the identity."), round=False),
            "lora_rank": number_input("lora_rank", "0 = tokens only. Otherwise a LoRA of this rank on the "
                                                   "cross-attention projections, trained with the tokens."),
            "seed": number_input("seed", "Seeds initialisation, sampling and augmentation; keep it when resuming "
                                         "to repeat the same run.", control_after_generate=False),
            "save_name": ("STRING", {"default": DEFAULT_SAVE_NAME, "tooltip": (
                "File name (no extension) for the tokens in models/idfuse/tokens and the LoRA in models/loras: "
                f"{SAVE_NAME_RULE}.")}),
            "resume_from": ([NO_RESUME, *tokens], {"default": NO_RESUME, "tooltip": (
                "Continue a run from its token file (with its LoRA and .trainstate). Use the same settings and "
                "photos; save_name may be the same file.")}),
        }, "optional": {
            "images": ("IMAGE", {"tooltip": "1-10 photos of the person, face clearly visible. Resized to the "
                                            "options' resolution. Or connect training_photos instead."}),
            "masks": ("MASK", {"tooltip": "Face masks, one per photo (or one for all), 1 = face. Resized to the "
                               "photos. Without them a face detector makes them."}),
            "face_analysis": ("FACE_ANALYSIS", {"tooltip": "A face backend (IDFuse Load Face Analysis) to find faces "
                                                "when no masks are given; else the built-in dlib HOG detector."}),
            "options": (OPTIONS_TYPE, {"tooltip": "The other training settings, from IDFuse Training Options; "
                                                  "without it every one has its default."}),
            "validation_images": ("IMAGE", {"tooltip": (
                "A held-out photo of the person (not trained on) for the validation loss (Training Options' "
                "validation_loss); without it the last training photo is held out.")}),
            "training_photos": (PHOTOS_TYPE, {"tooltip": (
                "Photos from IDFuse Load Training Photos (a folder, any sizes, optional .txt captions): cropped "
                "around the face at the training resolution, never squashed. Use instead of images.")}),
        }}

    # images stays the fourth parameter (it was the fourth input before 0.5.0 made it optional); ComfyUI passes
    # every input by name.
    def train(self, model, clip, vae, images=None, placeholder: str = DEFAULTS.placeholder,
              initializer: str = DEFAULTS.initializer, steps: int = DEFAULTS.steps,
              learning_rate: float = DEFAULTS.learning_rate, attention_weight: float = DEFAULTS.attention_weight,
              lora_rank: int = DEFAULTS.lora_rank, seed: int = DEFAULTS.seed, save_name: str = DEFAULT_SAVE_NAME,
              resume_from: str = NO_RESUME, masks=None, face_analysis=None, options: dict | None = None,
              validation_images=None, training_photos=None):
        settings = TrainingSettings(
            placeholder=placeholder.strip(), initializer=initializer.strip(), steps=steps, learning_rate=learning_rate,
            attention_weight=attention_weight, lora_rank=lora_rank, seed=seed, **(options or {}))
        with torch.inference_mode(False), torch.enable_grad():
            return TrainingRun(model, clip, vae, settings, save_name, resume_from).run(
                images, masks, face_analysis, validation_images, training_photos)


class IDFuseTrainingOptions:
    DESCRIPTION = ("The trainer's further settings: stages, attention loss, LoRA targets, prompt templates, "
                   "augmentation, resolution, batching, precision, checkpoints, learning-rate schedule, Min-SNR "
                   "weighting and the generator's width. Connect it to the options input of IDFuse Train Identity; "
                   "without it the trainer uses these defaults.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (OPTIONS_TYPE,)
    RETURN_NAMES = ("options",)
    OUTPUT_TOOLTIPS = ("The settings; connect to the options input of IDFuse Train Identity.",)
    FUNCTION = "options"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "num_stages": number_input("num_stages", "Denoising-time stages S; each has its own key and value "
                                                     "vector (SeFi-IDE default 5)."),
            "attention_mode": choice_input("attention_mode", ATTENTION_MODES, (
                "face_mask: the placeholder's attention should cover the face mask: mean of A over the background − "
                "mean of A over the face. reference_prompt: it should match 'person' in the same prompt with the "
                "initialiser (same query, same pass; needs no mask). both: the sum. off: diffusion loss only.")),
            "loss_layers": choice_input("loss_layers", list(LOSS_LAYER_CHOICES), (
                "Downscales (latent / layer grid) of the cross-attention layers the attention loss reads. '2, 4' = "
                "SD1.5's 32x32 and 16x16 layers at 512 px (the method's default); for SDXL it is every layer, "
                "'4' is cheaper.")),
            "lora_targets": choice_input("lora_targets", list(LORA_TARGET_CHOICES), (
                "Cross-attention projections the LoRA adapts (when lora_rank > 0). K and V (default) act only "
                "through the text, so the model stays unchanged for prompts without the identity's influence on "
                "attention.")),
            "templates": text_input("templates", "Training prompts, one per line, each with {} where the "
                                                 "placeholder goes.", multiline=True),
            "augmentation": choice_input("augmentation", AUGMENTATIONS, (
                "Copies of the photos made once before training: mirrored, and/or 3 random crops of 75-100% "
                "scaled back up. Masks follow.")),
            "resolution": number_input("resolution", (
                "Training size: photos are scaled to about resolution² pixels, sides rounded to 64. 512 for SD1.5, "
                "1024 for SDXL.")),
            "batch_size": number_input("batch_size", "Samples per micro-batch (each with its own photo, template "
                                                     "and timestep)."),
            "gradient_accumulation": number_input("gradient_accumulation", "Micro-batches per optimiser step."),
            "gradient_checkpointing": boolean_input("gradient_checkpointing", (
                "Recompute UNet layers in the backward pass: less memory, about a third slower.")),
            "training_dtype": choice_input("training_dtype", TRAINING_DTYPES, (
                "auto = bfloat16 where the GPU has it and the model can compute in it, else the model's own dtype. "
                "Loss scaling whenever anything computes in float16 (float16 autocast, float16 weights or manual "
                "cast). float16: for GPUs without bfloat16 (GTX 10xx/16xx, RTX 20xx, T4). float32: exact but "
                "slowest. The trained weights stay float32.")),
            "checkpoint_every": number_input("checkpoint_every", "Save every N steps (0 = only at the end and when "
                                                                 "stopped)."),
            "lr_schedule": choice_input("lr_schedule", LR_SCHEDULES, (
                "Learning-rate schedule (diffusers' get_scheduler; needs diffusers unless constant).")),
            "warmup_steps": number_input("warmup_steps", "Steps over which the learning rate rises from 0 (needs "
                                                         "diffusers when > 0)."),
            "min_snr_gamma": number_input("min_snr_gamma", "Min-SNR-γ loss weighting (5 is common); 0 = off. Needs "
                                                           "diffusers."),
            "detach_reference": boolean_input("detach_reference", (
                "reference_prompt: treat the initialiser's attention as a fixed target (the method's default). "
                "Off lets the LoRA move it too.")),
            "generator_width": number_input("generator_width", (
                "Width of the generator's attention block over the initialiser word (a multiple of its "
                f"{GeneratorConfig.heads} heads); wider = more trainable parameters. A resumed run keeps its own.")),
            "reference_loss_scale": number_input("reference_loss_scale", (
                "reference_prompt and both: that term is weighted attention_weight × this. Its MSE between attention "
                "probabilities gives the tokens ~1000× less gradient than the face_mask term at the same λ "
                "(measured); 1 = the weighting before 0.3.0. The training report shows each term's gradient share."),
                round=False),
            "optimizer": choice_input("optimizer", available_optimizers(), (
                "AdamW: the default (torch's, no weight decay). AdamW8bit (bitsandbytes; offered only with a CUDA GPU "
                "and bitsandbytes installed): Adam moments in 8 bits, a quarter of AdamW's optimiser memory. Prodigy "
                "(pip install prodigyopt): finds its own step size and multiplies it by learning_rate, so set "
                "learning_rate to 1.0, its convention; no weight decay. A resumed run keeps its optimiser and its "
                "state.")),
            "sample_prompts": text_input("sample_prompts", (
                "Prompts rendered while training, one per line, each with the placeholder (or {} for it), e.g. "
                "'sks as an astronaut, oil painting'. Empty = no sample images. Saved in "
                "models/idfuse/tokens/<save_name>.samples/."), multiline=True),
            "sample_every": number_input("sample_every", (
                "Render the sample prompts (and measure the validation loss) every N steps, and after the last "
                "step; 0 = never.")),
            "sample_steps": number_input("sample_steps", "Sampler steps of each sample image (few: they are "
                                                         "previews, and their time is reported apart)."),
            "sample_size": number_input("sample_size", "Side of the square sample images in pixels (512 for SD1.5; "
                                                       "768-1024 for SDXL)."),
            "validation_loss": boolean_input("validation_loss", (
                "Every sample_every steps, the diffusion loss of a held-out photo (Train Identity's "
                "validation_images, else the last photo, then not trained on) at fixed timesteps and noise, drawn "
                "on the loss curve: when it rises while the training loss falls, the identity is overfitting.")),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, optimizer):
        # A saved workflow may name an optimiser this machine does not offer (AdamW8bit without CUDA): ComfyUI's
        # own check would only say "not in list"; check_optimizer in options() says why and what to do.
        return True

    def options(self, num_stages: int, attention_mode: str, loss_layers: str, lora_targets: str, templates: str,
                augmentation: str, resolution: int, batch_size: int, gradient_accumulation: int,
                gradient_checkpointing: bool, training_dtype: str, checkpoint_every: int, lr_schedule: str,
                warmup_steps: int, min_snr_gamma: float, detach_reference: bool, generator_width: int,
                reference_loss_scale: float, optimizer: str = DEFAULTS.optimizer, sample_prompts: str = "",
                sample_every: int = DEFAULTS.sample_every, sample_steps: int = DEFAULTS.sample_steps,
                sample_size: int = DEFAULTS.sample_size, validation_loss: bool = DEFAULTS.validation_loss):
        """The TrainingSettings fields these widgets set (checked here, so a bad value fails before training)."""
        return ({
            "num_stages": num_stages, "attention_mode": attention_mode,
            "loss_downscales": parse_loss_layers(loss_layers), "lora_targets": parse_lora_targets(lora_targets),
            "templates": parse_templates(templates), "augmentation": augmentation, "resolution": resolution,
            "batch_size": batch_size, "gradient_accumulation": gradient_accumulation,
            "gradient_checkpointing": gradient_checkpointing, "training_dtype": training_dtype,
            "checkpoint_every": checkpoint_every, "lr_schedule": lr_schedule, "warmup_steps": warmup_steps,
            "min_snr_gamma": min_snr_gamma, "detach_reference": detach_reference,
            "generator_width": check_generator_width(generator_width, GeneratorConfig.heads),
            "reference_loss_scale": reference_loss_scale, "optimizer": check_optimizer(optimizer),
            "sample_prompts": parse_sample_prompts(sample_prompts), "sample_every": sample_every,
            "sample_steps": sample_steps, "sample_size": sample_size, "validation_loss": validation_loss,
        },)


class IDFuseFaceMasks:
    DESCRIPTION = ("Finds the main face in each photo and makes an elliptic face mask (1 = face), as IDFuse Train "
                   "Identity does when its masks input is empty. Use it to check the masks before training, or "
                   "edit them (e.g. Grow Mask) and connect them to the trainer. The built-in detector (dlib's HOG, "
                   "public domain, installed with the pack) needs nothing else; connect IDFuse Load Face Analysis "
                   "for dlib's CNN or insightface's detector, which also find turned faces.")
    CATEGORY = "IDFuse/training"
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("masks", "preview")
    OUTPUT_TOOLTIPS = ("One face mask per photo, the photos' size.",
                       "The photos with everything outside the mask dimmed.")
    FUNCTION = "find"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Photos of the person, one face each (the largest counts)."}),
        }, "optional": {
            "face_analysis": ("FACE_ANALYSIS", {"tooltip": "A face backend (IDFuse Load Face Analysis); without it "
                                                "the built-in dlib HOG detector is used."}),
        }}

    def find(self, images: torch.Tensor, face_analysis=None):
        masks = face_masks(images, face_analysis, required=True)
        return masks, mask_preview(images, masks)


NODE_CLASS_MAPPINGS = {"IDFuseTrainIdentity": IDFuseTrainIdentity, "IDFuseTrainingOptions": IDFuseTrainingOptions,
                       "IDFuseFaceMasks": IDFuseFaceMasks}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFuseTrainIdentity": "IDFuse Train Identity",
                              "IDFuseTrainingOptions": "IDFuse Training Options",
                              "IDFuseFaceMasks": "IDFuse Face Masks"}
