"""Quality harness: identity similarity against prompt faithfulness (CLIP-T) of plain sampling, IDFuse identity
tokens and Infinite-ID, on your checkpoint, identities and prompts. docs/QUALITY.md explains it all.

For each prompt and seed it samples, in this process and through the pack's node classes and ComfyUI's own
sampling (comfy.sample):
  plain        the prompt with the class phrase: the floor (no identity method)
  tokens       IDFuse Encode With ID + Apply ID Tokens, per --token-strengths (needs --tokens per identity)
  infinite_id  IDFuse Face Embed + Infinite-ID Sampler, per --id-weights (needs --id-encoder, --face-backend)
decodes, scores identity with the Identity Score code (models/faces/scoring.py) against the identity's photos
with each face backend in --score-with (default: every one that loads here), and scores prompt faithfulness
CLIP-T (100 x cosine of image and text embeddings) with open_clip from a LOCAL weights file, or with
transformers from a LOCAL saved model folder (--clip-library): nothing is downloaded.
Writes <out>/results.json, <out>/results.csv, <out>/tradeoff.png (identity vs CLIP-T per method and setting)
and the images; the last line printed is a JSON summary. Missing files: exit code 2 and what to pass.

The diffusion model, text encoder and VAE come from a ModelSource: from the command line, the checkpoint
(CheckpointModels, loaded by ComfyUI); a caller that already holds models (the tests' small random-weight
ones) passes InMemoryModels to run(). Everything after loading is the same code.

    python bench/quality.py --checkpoint sd15.safetensors --identity photos/alice --tokens alice.safetensors \\
        --id-encoder ip-adapter-faceid_sd15.bin --face-backend buffalo_l --face-models ComfyUI/models/insightface \\
        --clip-model ViT-H-14 --clip-weights open_clip_pytorch_model.bin --out quality-run
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import comfy_env  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_PROMPTS = BENCH_DIR / "quality_prompts.txt"
PLACEHOLDER = "{}"
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METHODS = ("plain", "tokens", "infinite_id")


class Refusal(Exception):
    """A file or setting the harness cannot run without; main() prints it and exits with code 2."""


@dataclass(frozen=True)
class Identity:
    name: str
    photos: list[Path]
    tokens: Path | None


@dataclass
class Record:
    """One generated image, scored."""

    method: str
    setting: str  # e.g. "strength=1", "id_weight=0.8"; "" for plain sampling
    identity: str
    prompt_index: int
    prompt: str  # the text CLIP-T compares with (the class phrase in the placeholder's place)
    seed: int
    image: str  # path relative to the output folder
    seconds: float
    clip_t: float = math.nan
    identity_scores: dict[str, dict] = field(default_factory=dict)  # backend -> similarity, faces, distance, ...


# --- arguments and the files they name ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    files = parser.add_argument_group("models and data")
    files.add_argument("--checkpoint", help="SD1.5 or SDXL single-file checkpoint (.safetensors); required")
    files.add_argument("--identity", action="append", required=True, metavar="FOLDER",
                       help="a folder of photos of one person (repeat for several identities; name = folder name)")
    files.add_argument("--tokens", action="append", default=[], metavar="FILE",
                       help="an IDFuse identity-token file per --identity, in the same order (enables 'tokens')")
    files.add_argument("--id-encoder", metavar="FILE",
                       help="an Infinite-ID ID encoder (IDFuse or IP-Adapter FaceID file; enables 'infinite_id')")
    files.add_argument("--face-backend", metavar="MODEL",
                       help="face model for IDFuse Face Embed (Infinite-ID), e.g. buffalo_l for FaceID files")
    files.add_argument("--face-models", action="append", default=[], metavar="FOLDER",
                       help="insightface root(s) holding models/<pack>/*.onnx (ComfyUI/models/insightface)")
    files.add_argument("--face-provider", default="CPU", help="execution provider of the face models")
    files.add_argument("--score-with", action="append", default=[], metavar="MODEL",
                       help="face model(s) that score identity (default: every face model that loads here)")
    files.add_argument("--clip-vision", metavar="FILE",
                       help="CLIP vision model (ViT-H/14) for ID encoders that use CLIP features of the face")
    files.add_argument("--clip-library", choices=[kind.library for kind in CLIP_SCORERS],
                       default=CLIP_SCORERS[0].library, help="the library that computes CLIP-T (default: %(default)s)")
    files.add_argument("--clip-model", default="ViT-H-14",
                       help="open_clip: model name for CLIP-T (ViT-H-14, ViT-L-14); transformers: not used")
    files.add_argument("--clip-weights", required=True, metavar="PATH",
                       help="open_clip: local weights file of --clip-model (e.g. open_clip_pytorch_model.bin); "
                            "transformers: a local folder saved with CLIPModel/CLIPProcessor.save_pretrained")
    files.add_argument("--clip-config", metavar="JSON",
                       help="open_clip: a model config file, registered under its file name (for other models)")
    files.add_argument("--prompts", default=str(DEFAULT_PROMPTS), metavar="FILE",
                       help=f"prompts, one a line with {PLACEHOLDER} for the person (default {DEFAULT_PROMPTS.name})")
    runs = parser.add_argument_group("sampling")
    runs.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                      help="methods to run (those whose files are missing are left out)")
    runs.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0 = all)")
    runs.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    runs.add_argument("--token-strengths", type=float, nargs="+", default=[1.0], help="Apply ID Tokens strength")
    runs.add_argument("--id-weights", type=float, nargs="+", default=[0.6, 1.0], help="Infinite-ID id_weight")
    runs.add_argument("--class-phrase", default="a person",
                      help="what stands in the placeholder's place for plain sampling, Infinite-ID and CLIP-T")
    runs.add_argument("--negative", default="blurry, lowres, deformed, watermark, text")
    runs.add_argument("--steps", type=int, default=30)
    runs.add_argument("--cfg", type=float, default=7.0)
    runs.add_argument("--sampler", default="euler")
    runs.add_argument("--scheduler", default="normal")
    runs.add_argument("--size", type=int, default=512, help="image width and height in pixels (multiple of 8)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    return parser.parse_args(argv)


def existing_file(path: str | None, what: str, flag: str) -> Path:
    if not path or not Path(path).is_file():
        raise Refusal(f"{what} not found: {path or '(none given)'}. Pass {flag} <file>; nothing is downloaded.")
    return Path(path)


def identity_photos(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise Refusal(f"identity folder not found: {folder}. Pass --identity <folder of photos of one person>.")
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise Refusal(f"identity folder {folder} holds no photos ({', '.join(PHOTO_SUFFIXES)}). Put photos of the "
                      f"person in it.")
    return photos


def read_prompts(path: Path, limit: int) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    without = [p for p in prompts if PLACEHOLDER not in p]
    if without or not prompts:
        raise Refusal(f"prompts file {path}: every prompt needs the placeholder {PLACEHOLDER} for the person"
                      f"{f' (missing in: {without[0]!r})' if without else ' (it holds none)'}.")
    return prompts[:limit] if limit > 0 else prompts


def check_inputs(args: argparse.Namespace, models: ModelSource) -> tuple[list[Identity], list[str]]:
    """Every file the run needs, checked before anything is loaded."""
    models.check(args)
    clip_scorer_kind(args.clip_library).check(args)
    prompts = read_prompts(existing_file(args.prompts, "prompts file", "--prompts"), args.max_prompts)
    if args.tokens and len(args.tokens) != len(args.identity):
        raise Refusal(f"{len(args.tokens)} --tokens file(s) for {len(args.identity)} --identity folder(s): pass one "
                      f"token file per identity, in the same order (or none to leave out 'tokens').")
    tokens = [existing_file(path, "identity-token file", "--tokens") for path in args.tokens]
    identities = [Identity(Path(folder).name, identity_photos(Path(folder)), tokens[i] if tokens else None)
                  for i, folder in enumerate(args.identity)]
    if args.id_encoder:
        existing_file(args.id_encoder, "ID encoder", "--id-encoder")
        if not args.face_backend:
            raise Refusal("--id-encoder needs --face-backend <face model> for IDFuse Face Embed (e.g. buffalo_l for "
                          "IP-Adapter FaceID files, the model an IDFuse encoder was trained with).")
    if args.clip_vision:
        existing_file(args.clip_vision, "CLIP vision model", "--clip-vision")
    for folder in args.face_models:
        if not Path(folder).is_dir():
            raise Refusal(f"--face-models folder not found: {folder}. Pass the folder holding models/<pack>/.")
    if args.size % 8:
        raise Refusal(f"--size {args.size} is not a multiple of 8.")
    return identities, prompts


# --- models ------------------------------------------------------------------------------------------------


@dataclass
class LoadedModels:
    model: object  # a ModelPatcher
    clip: object  # ComfyUI's CLIP
    vae: object  # ComfyUI's VAE


class ModelSource:
    """Where run() gets the diffusion model, text encoder and VAE from: checked with the other inputs, loaded once."""

    def check(self, args: argparse.Namespace) -> None:
        """Refuse (Refusal) before anything loads when a file this source needs is missing."""

    def load(self, args: argparse.Namespace) -> LoadedModels:
        raise NotImplementedError


class CheckpointModels(ModelSource):
    """The command line's: --checkpoint, loaded by ComfyUI as its checkpoint loader does."""

    def check(self, args: argparse.Namespace) -> None:
        existing_file(args.checkpoint, "checkpoint", "--checkpoint")

    def load(self, args: argparse.Namespace) -> LoadedModels:
        import comfy.sd

        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True,
                                                                     output_clip=True)
        return LoadedModels(model, clip, vae)


@dataclass
class InMemoryModels(ModelSource):
    """Models a caller already holds (the tests' small random-weight ones); --checkpoint is not used."""

    models: LoadedModels

    def load(self, args: argparse.Namespace) -> LoadedModels:
        return self.models


# --- CLIP-T: one scorer per library ----------------------------------------------------------------------------


class ClipScorer:
    """Prompt faithfulness: 100 x cosine of a CLIP model's image and text embeddings (as the papers report it).
    A library's scorer says how its weights are checked and loaded and gives the two embeddings."""

    library = ""  # the --clip-library name
    module = ""  # what is imported
    install = ""  # how to get it

    @classmethod
    def check(cls, args: argparse.Namespace) -> None:
        """Refuse (Refusal) when the weights --clip-weights names are missing."""
        raise NotImplementedError

    @classmethod
    def import_library(cls):
        try:
            return importlib.import_module(cls.module)
        except ImportError as error:
            raise Refusal(f"{cls.module} cannot be imported ({error}); CLIP-T with --clip-library {cls.library} "
                          f"needs it: {cls.install}.") from error

    def __init__(self, args: argparse.Namespace, device):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: local files are loaded, never a hub's
        self.device = device

    def embeddings(self, picture, text: str):
        """The image and text embeddings [1, D] of a PIL picture and a prompt (any scale)."""
        raise NotImplementedError

    def __call__(self, image, text: str) -> float:
        """image: one decoded image [H, W, 3] in 0..1."""
        import torch
        from PIL import Image

        picture = Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
        with torch.no_grad():
            image_features, text_features = (torch.nn.functional.normalize(f.float(), dim=-1)
                                             for f in self.embeddings(picture, text))
        return float(100.0 * (image_features * text_features).sum())


class OpenClipScorer(ClipScorer):
    """open_clip's model --clip-model with the weights file --clip-weights (ViT-H-14 or ViT-L-14, the papers')."""

    library = "open_clip"
    module = "open_clip"
    install = ("pip install open_clip_torch (it needs torchvision, of the build that matches your torch: "
               "ComfyUI's own install brings one)")

    @classmethod
    def check(cls, args: argparse.Namespace) -> None:
        existing_file(args.clip_weights, f"open_clip weights of {args.clip_model}", "--clip-weights")
        if args.clip_config:
            existing_file(args.clip_config, "open_clip model config", "--clip-config")

    def __init__(self, args: argparse.Namespace, device):
        super().__init__(args, device)
        open_clip = self.import_library()
        if args.clip_config:
            open_clip.add_model_config(Path(args.clip_config))
        if args.clip_model not in open_clip.list_models():
            raise Refusal(f"open_clip has no model '{args.clip_model}'; use ViT-H-14 or ViT-L-14 (or pass "
                          f"--clip-config).")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            args.clip_model, pretrained=str(args.clip_weights), device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(args.clip_model)

    def embeddings(self, picture, text: str):
        pixels = self.preprocess(picture).unsqueeze(0).to(self.device)
        return self.model.encode_image(pixels), self.model.encode_text(self.tokenizer([text]).to(self.device))


class TransformersClipScorer(ClipScorer):
    """transformers' CLIPModel and CLIPProcessor from the local folder --clip-weights (e.g. a saved
    openai/clip-vit-large-patch14, the papers' ViT-L-14); local_files_only, so nothing is downloaded."""

    library = "transformers"
    module = "transformers"
    install = "pip install transformers"

    @classmethod
    def check(cls, args: argparse.Namespace) -> None:
        folder = Path(args.clip_weights)
        if not (folder / "config.json").is_file():
            raise Refusal(f"transformers CLIP model folder not found: {args.clip_weights} (no config.json in it). "
                          f"Pass --clip-weights <folder saved with CLIPModel/CLIPProcessor.save_pretrained>; "
                          f"nothing is downloaded.")

    def __init__(self, args: argparse.Namespace, device):
        super().__init__(args, device)
        transformers = self.import_library()
        folder = str(args.clip_weights)
        try:
            self.model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
            self.processor = transformers.CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise Refusal(f"--clip-weights {folder} does not hold a CLIP model and processor ({error}); save both "
                          f"there with save_pretrained.") from error

    def embeddings(self, picture, text: str):
        inputs = self.processor(text=[text], images=[picture], return_tensors="pt", padding=True, truncation=True)
        outputs = self.model(**{name: value.to(self.device) for name, value in inputs.items()})
        return outputs.image_embeds, outputs.text_embeds


# open_clip first: the default, with the papers' own weights files.
CLIP_SCORERS: list[type[ClipScorer]] = [OpenClipScorer, TransformersClipScorer]


def clip_scorer_kind(library: str) -> type[ClipScorer]:
    return next(kind for kind in CLIP_SCORERS if kind.library == library)  # argparse allows only these


def node_defaults(node_class) -> dict:
    """A node's widget defaults (a combo's first choice), for the inputs a caller does not set."""
    defaults = {}
    inputs = node_class.INPUT_TYPES()
    for name, spec in {**inputs.get("required", {}), **inputs.get("optional", {})}.items():
        options = spec[1] if len(spec) > 1 else {}
        if "default" in options:
            defaults[name] = options["default"]
        elif isinstance(spec[0], (list, tuple)) and spec[0]:
            defaults[name] = spec[0][0]
    return defaults


def register_folders(args: argparse.Namespace) -> None:
    """Make the files the node classes load visible to folder_paths (nothing is copied)."""
    import folder_paths

    from comfyui_idfuse.models.faces import BACKENDS
    from comfyui_idfuse.nodes.glue.folders import ID_ENCODERS_FOLDER, ID_TOKENS_FOLDER

    for path in args.tokens:
        folder_paths.add_model_folder_path(ID_TOKENS_FOLDER, str(Path(path).resolve().parent))
    if args.id_encoder:
        folder_paths.add_model_folder_path(ID_ENCODERS_FOLDER, str(Path(args.id_encoder).resolve().parent))
    for folder in args.face_models:
        for kind in BACKENDS:
            if kind.model_folder:
                folder_paths.add_model_folder_path(kind.model_folder, str(Path(folder).resolve()))


def load_face_backend(model_name: str, provider: str):
    from comfyui_idfuse.nodes.faces import IDFuseLoadFaceAnalysis

    settings = {**node_defaults(IDFuseLoadFaceAnalysis), "model_name": model_name, "provider": provider}
    (backend,) = IDFuseLoadFaceAnalysis().load(**settings)
    return backend


def scoring_backends(args: argparse.Namespace) -> dict[str, object]:
    """The face backends that score identity: those asked for (each must load), else the first face model of
    each embedding space that loads here (dlib's CNN detector, slow on CPU, only when asked)."""
    from comfyui_idfuse.models.errors import FaceAnalysisError
    from comfyui_idfuse.models.faces import model_names

    known = model_names()
    for name in [*args.score_with, *([args.face_backend] if args.face_backend else [])]:
        if name not in known:
            raise Refusal(f"unknown face model '{name}'; use one of: {', '.join(known)}.")
    backends: dict[str, object] = {}
    for name in args.score_with or known:
        try:
            backend = load_face_backend(name, args.face_provider)
        except FaceAnalysisError as error:
            if args.score_with:
                raise Refusal(f"face model '{name}' (--score-with) cannot load: {error}") from error
            print(f"not scoring with {name}: {error}", flush=True)
            continue
        if args.score_with or all(b.embedding_space != backend.embedding_space for b in backends.values()):
            backends[name] = backend
    if not backends:
        raise Refusal("no face model loads here, so identity cannot be scored: install dlib-bin and "
                      "face-recognition-models (requirements.txt), or pass --face-models <insightface root>.")
    print("scoring identity with " + ", ".join(f"{n} ({b.embedding_space})" for n, b in backends.items()), flush=True)
    return backends


def load_photos(paths: Sequence[Path]):
    """The photos as one IMAGE batch: each centred on a black canvas of the largest width and height (the
    batch needs one size; the faces keep their shape and pixels)."""
    import numpy as np
    import torch
    from PIL import Image

    pictures = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    height, width = max(p.shape[0] for p in pictures), max(p.shape[1] for p in pictures)
    batch = np.zeros((len(pictures), height, width, 3), np.uint8)
    for index, picture in enumerate(pictures):
        top, left = (height - picture.shape[0]) // 2, (width - picture.shape[1]) // 2
        batch[index, top:top + picture.shape[0], left:left + picture.shape[1]] = picture
    return torch.from_numpy(batch).float() / 255.0


# --- sampling ---------------------------------------------------------------------------------------------


@dataclass
class Sampling:
    model: object
    clip: object
    vae: object
    args: argparse.Namespace

    def encode(self, text: str):
        """CLIPTextEncode's conditioning of a plain prompt."""
        tokens = self.clip.tokenize(text)
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    def latent(self):
        import torch

        side = self.args.size // 8
        return torch.zeros(1, 4, side, side)

    def ksampler(self, model, positive, negative, seed: int):
        """The latent of ComfyUI's KSampler path (comfy.sample.sample) from the seed's noise."""
        import comfy.sample

        latent = comfy.sample.fix_empty_latent_channels(model, self.latent())
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(model, noise, self.args.steps, self.args.cfg, self.args.sampler,
                                   self.args.scheduler, positive, negative, latent, denoise=1.0,
                                   disable_pbar=True, seed=seed)

    def decode(self, samples):
        return self.vae.decode(samples)[0].clamp(0, 1).cpu()


def run_plain(sampling: Sampling, text: str, negative, seed: int):
    return sampling.decode(sampling.ksampler(sampling.model, sampling.encode(text), negative, seed))


def run_tokens(sampling: Sampling, id_tokens, text: str, negative, seed: int, strength: float):
    from comfyui_idfuse.nodes.tokens import IDFuseApplyIDTokens, IDFuseEncodeWithID

    (positive,) = IDFuseEncodeWithID().encode(sampling.clip, id_tokens, text)
    (patched,) = IDFuseApplyIDTokens().apply(sampling.model, positive, strength, 0.0, 1.0)
    return sampling.decode(sampling.ksampler(patched, positive, negative, seed))


def run_infinite_id(sampling: Sampling, id_encoder, id_embeds, text: str, negative, seed: int, id_weight: float):
    from comfyui_idfuse.nodes.infinite_id import IDFuseInfiniteIDSampler

    args = sampling.args
    # The node's own defaults for every Infinite-ID setting but the swept id_weight.
    settings = {**node_defaults(IDFuseInfiniteIDSampler), "id_weight": id_weight}
    settings.update(model=sampling.model, positive=sampling.encode(text), negative=negative, id_encoder=id_encoder,
                    id_embeds=id_embeds, latent_image={"samples": sampling.latent()}, seed=seed, steps=args.steps,
                    cfg=args.cfg, sampler_name=args.sampler, scheduler=args.scheduler, denoise=1.0)
    id_stream, _text_stream = IDFuseInfiniteIDSampler().sample(**settings)
    return sampling.decode(id_stream["samples"])


# --- scoring and results ---------------------------------------------------------------------------------------


def identity_score(backend, reference, image) -> dict:
    from comfyui_idfuse.models.faces.scoring import score_images

    batch, _ = score_images(backend, image[None], reference)
    score = batch.scores[0]
    return {"similarity": round(score.similarity, 5), "faces": len(score.faces),
            "distance": None if score.distance is None else round(score.distance, 5),
            "same_person": score.same_person}


def summarise(records: Sequence[Record], backends: Sequence[str]) -> list[dict]:
    """Per method and setting: the mean CLIP-T and, per backend, the mean identity similarity (0 for images
    without a face), the share of images with a face and, with a distance threshold, the share below it."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        groups.setdefault((record.method, record.setting), []).append(record)
    rows = []
    for (method, setting), members in groups.items():
        row = {"method": method, "setting": setting, "images": len(members),
               "clip_t": round(statistics.fmean(r.clip_t for r in members), 4)}
        for name in backends:
            scored = [r.identity_scores[name] for r in members]
            row[f"identity[{name}]"] = round(statistics.fmean(s["similarity"] for s in scored), 4)
            row[f"face_rate[{name}]"] = round(statistics.fmean(s["faces"] > 0 for s in scored), 4)
            decided = [s["same_person"] for s in scored if s["same_person"] is not None]
            if decided:
                row[f"same_person_rate[{name}]"] = round(statistics.fmean(decided), 4)
        rows.append(row)
    return rows


def write_csv(path: Path, records: Sequence[Record], backends: Sequence[str]) -> None:
    columns = ["method", "setting", "identity", "prompt_index", "prompt", "seed", "image", "seconds", "clip_t"]
    for name in backends:
        columns += [f"{name} similarity", f"{name} faces", f"{name} distance", f"{name} same person"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for r in records:
            row = [r.method, r.setting, r.identity, r.prompt_index, r.prompt, r.seed, r.image, f"{r.seconds:.3f}",
                   f"{r.clip_t:.4f}"]
            for name in backends:
                s = r.identity_scores[name]
                row += [s["similarity"], s["faces"], "" if s["distance"] is None else s["distance"],
                        "" if s["same_person"] is None else ("yes" if s["same_person"] else "no")]
            writer.writerow(row)


METHOD_COLOURS = {"plain": (120, 120, 120), "tokens": (40, 90, 200), "infinite_id": (200, 70, 40)}


def draw_tradeoff(path: Path, summary: Sequence[dict], backends: Sequence[str]) -> None:
    """One panel per scoring backend: a point per method and setting at (mean CLIP-T, mean identity), labelled
    with its setting; up and to the right is better on both."""
    from PIL import Image, ImageDraw

    panel_w, panel_h, margin = 520, 420, 56
    picture = Image.new("RGB", (panel_w * len(backends), panel_h + 30), "white")
    draw = ImageDraw.Draw(picture)
    xs = [row["clip_t"] for row in summary]
    x_low, x_high = _padded_range(xs)
    for panel, name in enumerate(backends):
        left = panel * panel_w
        ys = [row[f"identity[{name}]"] for row in summary]
        y_low, y_high = _padded_range(ys)
        box = (left + margin, 24, left + panel_w - 16, panel_h - margin + 24)
        draw.rectangle(box, outline=(0, 0, 0))
        draw.text((left + margin, 6), f"identity ({name}) vs CLIP-T", fill=(0, 0, 0))
        draw.text((left + margin, box[3] + 22), f"CLIP-T (100 x cosine)  {x_low:.2f} .. {x_high:.2f}", fill=(0, 0, 0))
        draw.text((left + 4, box[1]), f"{y_high:.3f}", fill=(0, 0, 0))
        draw.text((left + 4, box[3] - 12), f"{y_low:.3f}", fill=(0, 0, 0))
        draw.text((left + 2, (box[1] + box[3]) // 2), "ident.", fill=(0, 0, 0))
        points = [(box[0] + (x_value - x_low) / (x_high - x_low) * (box[2] - box[0]),
                   box[3] - (y_value - y_low) / (y_high - y_low) * (box[3] - box[1]))
                  for x_value, y_value in zip(xs, ys, strict=True)]
        for method in dict.fromkeys(row["method"] for row in summary):  # a sweep's points joined in its order
            sweep = [point for point, row in zip(points, summary, strict=True) if row["method"] == method]
            if len(sweep) > 1:
                draw.line(sweep, fill=METHOD_COLOURS.get(method, (0, 0, 0)), width=1)
        for index, (row, (x, y)) in enumerate(zip(summary, points, strict=True)):
            colour = METHOD_COLOURS.get(row["method"], (0, 0, 0))
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
            draw.text((x + 7, y - 6 + 12 * (index % 2)), row["setting"] or row["method"], fill=colour)
    for index, (method, colour) in enumerate(METHOD_COLOURS.items()):
        draw.text((8 + 110 * index, panel_h + 12), f"o {method}", fill=colour)
    picture.save(path)


def _padded_range(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    low, high = min(finite), max(finite)
    pad = (high - low) * 0.1 or max(abs(high) * 0.05, 0.01)
    return low - pad, high + pad


# --- the run -----------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, models: ModelSource | None = None) -> dict:
    models = models or CheckpointModels()
    identities, prompts = check_inputs(args, models)
    scorer_kind = clip_scorer_kind(args.clip_library)
    scorer_kind.import_library()  # before the models load: a missing package is a refusal, not a late failure
    comfy_env.setup_comfy()
    import comfy.model_management
    import torch
    from PIL import Image

    from comfyui_idfuse.models.faces.scoring import reference_from_inputs
    from comfyui_idfuse.nodes.encoders import IDFuseLoadIDEncoder
    from comfyui_idfuse.nodes.faces import IDFuseFaceEmbed
    from comfyui_idfuse.nodes.tokens import IDFuseLoadIDTokens

    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    register_folders(args)
    methods = [m for m in args.methods
               if m == "plain" or (m == "tokens" and args.tokens) or (m == "infinite_id" and args.id_encoder)]
    skipped = sorted(set(args.methods) - set(methods))
    if skipped:
        print(f"left out (their files were not given): {', '.join(skipped)}", flush=True)

    started = time.perf_counter()
    with torch.inference_mode():
        loaded = models.load(args)
        clip_t = scorer_kind(args, comfy.model_management.get_torch_device())
        backends = scoring_backends(args)
        sampling = Sampling(loaded.model, loaded.clip, loaded.vae, args)
        negative = sampling.encode(args.negative)
        photos = {identity.name: load_photos(identity.photos) for identity in identities}
        references = {(identity.name, name): reference_from_inputs(backend, photos[identity.name])
                      for identity in identities for name, backend in backends.items()}
        id_tokens = {identity.name: IDFuseLoadIDTokens().load(identity.tokens.name)[0]
                     for identity in identities if "tokens" in methods}
        id_encoder = id_embeds = None
        if "infinite_id" in methods:
            (id_encoder,) = IDFuseLoadIDEncoder().load(Path(args.id_encoder).name)
            face_backend = backends.get(args.face_backend) or load_face_backend(args.face_backend, args.face_provider)
            clip_vision = None
            if args.clip_vision:
                import comfy.clip_vision

                clip_vision = comfy.clip_vision.load(args.clip_vision)
            id_embeds = {identity.name: IDFuseFaceEmbed().embed(photos[identity.name], face_backend, "largest", 0,
                                                                "normalized mean", "skip", clip_vision)[0]
                         for identity in identities}

        records: list[Record] = []

        def keep(method: str, setting: str, who: list[Identity], index: int, seed: int, generate, *inputs) -> None:
            begin = time.perf_counter()
            image = generate(sampling, *inputs)
            seconds = time.perf_counter() - begin
            tag = f"{method}{'_' + setting.replace('=', '') if setting else ''}"
            subject = who[0].name if len(who) == 1 else "all"
            file = Path("images") / f"{tag}_{subject}_p{index:02d}_s{seed}.png"
            Image.fromarray((image * 255).round().to(torch.uint8).numpy()).save(out / file)
            text = prompts[index].replace(PLACEHOLDER, args.class_phrase)
            faithfulness = clip_t(image, text)
            for identity in who:  # plain sampling is one image, scored against every identity (the floor)
                scores = {name: identity_score(backend, references[(identity.name, name)], image)
                          for name, backend in backends.items()}
                records.append(Record(method, setting, identity.name, index, text, seed, str(file), seconds,
                                      round(faithfulness, 4), scores))
            print(f"{file.name}: {seconds:.1f} s, CLIP-T {faithfulness:.2f}, identity "
                  + ", ".join(f"{name} {records[-1].identity_scores[name]['similarity']:.3f}" for name in backends),
                  flush=True)

        for index, prompt in enumerate(prompts):
            with_class = prompt.replace(PLACEHOLDER, args.class_phrase)
            for seed in args.seeds:
                if "plain" in methods:
                    keep("plain", "", identities, index, seed, run_plain, with_class, negative, seed)
                for identity in identities:
                    if "tokens" in methods:
                        tokens = id_tokens[identity.name]
                        with_word = prompt.replace(PLACEHOLDER, tokens.placeholder)
                        for strength in args.token_strengths:
                            keep("tokens", f"strength={strength:g}", [identity], index, seed, run_tokens, tokens,
                                 with_word, negative, seed, strength)
                    if "infinite_id" in methods:
                        for weight in args.id_weights:
                            keep("infinite_id", f"id_weight={weight:g}", [identity], index, seed, run_infinite_id,
                                 id_encoder, id_embeds[identity.name], with_class, negative, seed, weight)

    names = list(backends)
    summary = summarise(records, names)
    config = dict(vars(args))
    config["models"] = type(models).__name__
    config["methods_run"] = methods
    config["scoring_backends"] = {name: backend.embedding_space for name, backend in backends.items()}
    (out / "results.json").write_text(json.dumps({"config": config, "summary": summary,
                                                  "records": [vars(r) for r in records]}, indent=1),
                                      encoding="utf-8")
    write_csv(out / "results.csv", records, names)
    draw_tradeoff(out / "tradeoff.png", summary, names)
    return {"images": len({r.image for r in records}), "records": len(records), "seconds":
            round(time.perf_counter() - started, 1), "out": str(out), "summary": summary}


def main(argv: Sequence[str] | None = None, models: ModelSource | None = None) -> int:
    """The command line (models: CheckpointModels of --checkpoint unless given)."""
    args = parse_args(argv)
    try:
        result = run(args, models)
    except Refusal as refusal:
        print(f"quality.py: {refusal}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
