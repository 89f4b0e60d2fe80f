"""One error root, ``IDFuseError``: every error the pack raises is one of its subclasses, and the
documented user mistakes, made through the nodes, give the right class and a message that names
the input (or file) at fault."""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from factories import make_clip, make_id_tokens, make_model, random_stage_contexts, tiny_vae
from ip_adapter_files import FITS_TEST_UNETS, write_faceid
from safetensors.torch import save_file
from source_scan import PACK_ROOT, SOURCES, dotted, relative
from trainer_inputs import SIZE, settings

import comfyui_idfuse
from comfyui_idfuse import NODE_DISPLAY_NAME_MAPPINGS
from comfyui_idfuse.models import errors
from comfyui_idfuse.models.errors import (
    IDEncoderError,
    IDFuseError,
    IDFuseInputError,
    IDTokensError,
    NoFaceError,
    TrainingError,
)
from comfyui_idfuse.nodes.encoders import IDFuseLoadIDEncoder
from comfyui_idfuse.nodes.faces import IDFuseFaceEmbed, IDFuseLoadFaceAnalysis
from comfyui_idfuse.nodes.infinite_id import IDFuseInfiniteIDGuider, IDFuseInfiniteIDSampler
from comfyui_idfuse.nodes.tokens import STAGE_CONTEXTS, IDFuseApplyIDTokens, IDFuseEncodeWithID, IDFuseLoadIDTokens
from comfyui_idfuse.nodes.train import IDFuseTrainIdentity

# Raises whose class is not an IDFuseError subclass, on purpose: (file pattern, raised name) -> why.
# Keep it short. The node layer (nodes/) may not raise built-in errors even if listed here.
ALLOWED: dict[tuple[str, str], str] = {
    ("models/*", "NotImplementedError"): "a registry base class's method that a kind must override: a developer's "
                                         "mistake, not a user's",
    ("models/training/encoder_data.py", "item"): "the pair loader's background thread hands its own error (already "
                                                 "one of ours, or the reader's) to the consumer, which re-raises it",
}


def allowed(where: str, name: str) -> bool:
    return any(fnmatch(where, pattern) and name == raised for pattern, raised in ALLOWED)

# Modules of training (its nodes and their glue): the only ones that raise TrainingError.
TRAINING_MODULES = re.compile(r"^(models/training/.*|nodes/train\.py|nodes/glue/(training_\w+|lora_files|encoder_training|encoder_validation)\.py)$")



def module_of(path: Path) -> ModuleType:
    parts = path.relative_to(PACK_ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return importlib.import_module(".".join((comfyui_idfuse.__name__, *parts)))



def resolve(name: str, module: ModuleType):
    """The object a dotted name in a module refers to at module level (None: a local name)."""
    first, *rest = name.split(".")
    found = getattr(module, first, getattr(builtins, first, None))
    for attribute in rest:
        found = getattr(found, attribute, None)
    return found


def raises_in(tree: ast.AST, parameters: dict[str, ast.expr] | None = None):
    """Every ``raise`` with the annotations of the parameters of the functions around it."""
    parameters = parameters or {}
    if isinstance(tree, (ast.FunctionDef, ast.AsyncFunctionDef)):
        arguments = tree.args
        every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
        parameters = {**parameters, **{a.arg: a.annotation for a in every if a.annotation is not None}}
    if isinstance(tree, ast.Raise) and tree.exc is not None:  # a bare ``raise`` re-raises
        yield tree, parameters
    for child in ast.iter_child_nodes(tree):
        yield from raises_in(child, parameters)


def raised_class(name: str, module: ModuleType, parameters: dict[str, ast.expr], returns: dict[str, ast.expr]):
    """The exception class a raised name stands for: a class of the module, a parameter annotated
    ``type[X]``, or a function/method (``self.x``) of the module annotated ``-> X``; None if unknown."""
    found = resolve(name, module)
    if isinstance(found, type):
        return found
    annotation = parameters.get(name)
    if isinstance(annotation, ast.Subscript) and dotted(annotation.value) in ("type", "Type", "typing.Type"):
        return resolve(dotted(annotation.slice), module)
    function = name.removeprefix("self.")
    if "." not in function and function in returns:
        return resolve(dotted(returns[function]), module)
    return None


def raise_violations(tree: ast.Module, module: ModuleType, where: str) -> list[str]:
    node_layer = where.startswith("nodes/")
    may_raise_training = bool(TRAINING_MODULES.match(where))
    returns = {f.name: f.returns for f in ast.walk(tree)
               if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.returns is not None}
    found = []
    for node, parameters in raises_in(tree):
        target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        name = dotted(target) or ast.unparse(target)
        cls = raised_class(name, module, parameters, returns) if dotted(target) else None
        line = f"{where}:{node.lineno}: raise {name}"
        is_class = isinstance(cls, type) and issubclass(cls, BaseException)
        if is_class and issubclass(cls, IDFuseError):
            if issubclass(cls, TrainingError) and not may_raise_training:
                found.append(f"{line}: TrainingError outside training; use the capability's own class")
        elif node_layer and is_class and cls.__module__ == "builtins":
            found.append(f"{line}: a built-in error in the node layer; raise an IDFuseError subclass")
        elif not allowed(where, name):
            found.append(f"{line}: not an IDFuseError subclass (nor in ALLOWED)")
    return found


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return raise_violations(tree, module_of(path), relative(path))


def test_the_scan_covers_the_pack():
    names = {relative(p) for p in SOURCES}
    assert {"models/tokens/format.py", "nodes/tokens.py", "nodes/glue/infinite_id.py", "models/unet.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=relative)
def test_every_raise_is_an_idfuse_error(path):
    assert violations(path) == []


def test_allowed_entries_are_used():
    """An entry whose raise is gone is removed, so the list stays short and true."""
    raised = set()
    for path in SOURCES:
        for node, _parameters in raises_in(ast.parse(path.read_text(encoding="utf-8"))):
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            raised.add((relative(path), dotted(target) or ast.unparse(target)))
    unused = [entry for entry in ALLOWED if not any(fnmatch(where, entry[0]) and name == entry[1]
                                                    for where, name in raised)]
    assert unused == []


def test_the_scan_finds_what_it_forbids(tmp_path):
    source = tmp_path / "nodes" / "glue" / "bad.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from comfyui_idfuse.models import errors\n"
        "from comfyui_idfuse.models.errors import IDFuseInputError, IDTokensError, TrainingError\n"
        "def tokens_error(why) -> IDTokensError:\n"
        "    return IDTokensError(why)\n"
        "def check(value, error, chosen: type[IDFuseInputError]):\n"
        "    if value < 0:\n"
        "        raise IDFuseInputError('value: negative')\n"  # fine
        "    if value == 0:\n"
        "        raise errors.IDTokensError('tokens: none')\n"  # fine
        "    if value == 1:\n"
        "        raise ValueError('one')\n"  # a built-in in the node layer
        "    if value == 2:\n"
        "        raise TrainingError('two')\n"  # TrainingError outside training
        "    if value == 3:\n"
        "        raise error('three')\n"  # a name of unknown type
        "    if value == 4:\n"
        "        raise chosen('four')\n"  # fine: type[IDFuseInputError]
        "    if value == 5:\n"
        "        raise tokens_error('five')\n"  # fine: -> IDTokensError
        "    try:\n"
        "        pass\n"
        "    except OSError:\n"
        "        raise\n",  # fine: re-raised
        encoding="utf-8")
    spec = importlib.util.spec_from_file_location("idfuse_scan_sample", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = raise_violations(ast.parse(source.read_text()), module, relative(source, tmp_path))
    assert [line.split(": ")[1] for line in found] == ["raise ValueError", "raise TrainingError", "raise error"]


def test_error_classes_keep_the_builtin_types():
    """``except ValueError`` keeps catching bad inputs and files; missing layers are still LookupErrors."""
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, IDFuseError)]
    assert len(classes) >= 10
    for cls in classes:
        assert cls is IDFuseError or issubclass(cls, (ValueError, RuntimeError)), cls
    assert issubclass(errors.ModelLayerNotFound, LookupError)
    assert issubclass(errors.ModelLayerNotFound, errors.UnsupportedModelError)


# --- documented user mistakes, made through the nodes ----------------------------------------------


@pytest.fixture(scope="module")
def sd15():
    return make_model("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return make_model("sdxl")


@pytest.fixture(scope="module")
def sd15_clip(tokenizer_dir):
    return make_clip("sd15", tokenizer_dir)


def folder(name: str) -> Path:
    import folder_paths

    path = Path(folder_paths.get_folder_paths(name)[0])
    path.mkdir(parents=True, exist_ok=True)
    return path


def faceid_encoder(kind: str = "faceid"):
    name = f"ip-adapter-{kind}_sd15_errors.bin"
    write_faceid(folder("ipadapter") / name, kind, "sd15", FITS_TEST_UNETS)
    return IDFuseLoadIDEncoder().load(f"ipadapter/{name}")[0]


def face_embeds(clip_hidden=None):
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(0)), dim=-1)
    return SimpleNamespace(arcface=face, clip_hidden=clip_hidden)


def token_file(name: str, metadata: dict[str, str] | None = None, content: bytes | None = None) -> str:
    """A file in the identity-token folder: valid tokens with some metadata replaced, or raw bytes."""
    path = folder("idfuse_tokens") / name
    if content is not None:
        path.write_bytes(content)
    else:
        tokens = make_id_tokens()
        save_file(tokens.state_dict(), str(path), metadata={**tokens.metadata(), **(metadata or {})})
    return name


def load_tokens(request, name: str, **file):
    return IDFuseLoadIDTokens().load(token_file(name, **file) if file else name)


def foreign_token_file(request):
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(folder("idfuse_tokens") / "a-lora.safetensors"))
    return load_tokens(request, "a-lora.safetensors")


def encode(request, tokens_family: str, text: str, clip: str = "sd15_clip"):
    clip_object = None if clip is None else request.getfixturevalue(clip)
    return IDFuseEncodeWithID().encode(clip_object, make_id_tokens(tokens_family), text)


def apply_tokens(request, contexts_family: str | None = "sd15", start: float = 0.0, end: float = 1.0):
    if contexts_family is None:
        conditioning = [[torch.zeros(1, 77, 768), {}]]
    else:
        contexts = random_stage_contexts(contexts_family)
        conditioning = [[contexts.plain, {STAGE_CONTEXTS: contexts}]]
    return IDFuseApplyIDTokens().apply(request.getfixturevalue("sd15"), conditioning, 1.0, start, end)


INFINITE_ID_SETTINGS = {"id_weight": 1.0, "id_start_percent": 0.0, "id_end_percent": 1.0, "mixing": True,
                        "mix_blocks": "all", "mix_start_percent": 0.0, "mix_end_percent": 1.0, "adain": "mean",
                        "encoder_lora_strength": 0.0}


def conditioning(width: int = 768):
    return [[torch.randn(1, 77, width, generator=torch.Generator().manual_seed(1)), {}]]


def infinite_id_sampler(request, **changes):
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    with torch.inference_mode():
        return IDFuseInfiniteIDSampler().sample(
            request.getfixturevalue("sd15"), conditioning(), conditioning(), faceid_encoder(), face_embeds(), latent,
            seed=0, steps=1, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0,
            **{**INFINITE_ID_SETTINGS, **changes})


def infinite_id_guider(request, model: str = "sd15", kind: str = "faceid", **changes):
    width = 2048 if model == "sdxl" else 768
    return IDFuseInfiniteIDGuider().build(request.getfixturevalue(model), conditioning(width), conditioning(width),
                                          faceid_encoder(kind), face_embeds(), 5.0, False,
                                          **{**INFINITE_ID_SETTINGS, **changes})


def load_encoder(request, name: str):
    return IDFuseLoadIDEncoder().load(name)


def train(request, save_name: str):
    clip = make_clip("sd15", request.getfixturevalue("tokenizer_dir"))
    images = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return IDFuseTrainIdentity().train(request.getfixturevalue("sd15"), clip, tiny_vae(), images,
                                           **settings(save_name=save_name))


def face_embed_without_face(request):
    for module in ("insightface", "onnxruntime", "onnx", "cv2", "skimage"):
        pytest.importorskip(module, reason=f"the face nodes need {module} (requirements-face.txt)")
    import onnx_faces

    onnx_faces.write_model_pack(folder("insightface"), "buffalo_l")
    (analysis,) = IDFuseLoadFaceAnalysis().load("buffalo_l", "CPU", 640)
    wall = torch.full((1, 512, 512, 3), 0.5)  # a plain grey photo: no face anywhere
    return IDFuseFaceEmbed().embed(wall, analysis, "largest", 0, "normalized mean", "error")


@dataclass(frozen=True)
class Mistake:
    node: str
    mistake: str
    make: Callable  # (request) -> the node's output; must raise
    error: type[IDFuseError]
    names: tuple[str, ...]  # what the message must name: inputs, files, words


MISTAKES = [
    Mistake("Load ID Tokens", "a file that is not in the folder",
            lambda r: load_tokens(r, "gone.safetensors"), IDTokensError, ("tokens_name", "gone.safetensors")),
    Mistake("Load ID Tokens", "a foreign safetensors file (a LoRA)",
            foreign_token_file, IDTokensError, ("a-lora.safetensors", "not an IDFuse identity-token file")),
    Mistake("Load ID Tokens", "a corrupt file",
            lambda r: load_tokens(r, "corrupt.safetensors", content=b"\x00\x01 not safetensors"), IDTokensError,
            ("corrupt.safetensors",)),
    Mistake("Load ID Tokens", "num_stages in the metadata is not a number",
            lambda r: load_tokens(r, "bad-stages.safetensors", metadata={"num_stages": "abc"}), IDTokensError,
            ("bad-stages.safetensors", "num_stages", "'abc'")),
    Mistake("Load ID Tokens", "format_version in the metadata is not a number",
            lambda r: load_tokens(r, "bad-version.safetensors", metadata={"format_version": "x1"}), IDTokensError,
            ("bad-version.safetensors", "format_version", "'x1'")),
    Mistake("Encode With ID", "a prompt without the placeholder",
            lambda r: encode(r, "sd15", "a photo of a person"), IDTokensError, ("text", "'sks'")),
    Mistake("Encode With ID", "SDXL tokens with an SD1.5 CLIP",
            lambda r: encode(r, "sdxl", "a photo of sks"), IDTokensError, ("test-tokens", "SDXL", "SD1.5")),
    Mistake("Encode With ID", "no CLIP (a checkpoint without text encoder)",
            lambda r: encode(r, "sd15", "a photo of sks", clip=None), IDFuseInputError, ("clip",)),
    Mistake("Apply ID Tokens", "a conditioning without an identity prompt",
            lambda r: apply_tokens(r, None), IDFuseInputError, ("conditioning", "IDFuse Encode With ID")),
    Mistake("Apply ID Tokens", "an SDXL identity prompt on an SD1.5 model",
            lambda r: apply_tokens(r, "sdxl"), IDTokensError, ("conditioning", "sdxl", "sd15")),
    Mistake("Apply ID Tokens", "start_percent after end_percent",
            lambda r: apply_tokens(r, start=0.8, end=0.2), IDFuseInputError, ("start_percent", "end_percent", "0.8")),
    Mistake("Infinite-ID Sampler", "id_start_percent after id_end_percent",
            lambda r: infinite_id_sampler(r, id_start_percent=0.7, id_end_percent=0.3), IDFuseInputError,
            ("id_start_percent", "id_end_percent")),
    Mistake("Infinite-ID Guider", "mix_start_percent after mix_end_percent",
            lambda r: infinite_id_guider(r, mix_start_percent=0.9, mix_end_percent=0.1), IDFuseInputError,
            ("mix_start_percent", "mix_end_percent")),
    Mistake("Infinite-ID Guider", "an SD1.5 ID encoder with an SDXL model",
            lambda r: infinite_id_guider(r, "sdxl"), IDEncoderError,
            ("ipadapter/ip-adapter-faceid_sd15_errors.bin", "SDXL")),
    Mistake("Infinite-ID Guider", "a FaceID-Plus encoder with id_embeds lacking CLIP features",
            lambda r: infinite_id_guider(r, kind="faceid_plus"), IDEncoderError, ("id_embeds", "clip_vision")),
    Mistake("Load ID Encoder", "a file that is not in the folders",
            lambda r: load_encoder(r, "nope.bin"), IDEncoderError, ("nope.bin",)),
    Mistake("Train Identity", "a save_name with a path separator",
            lambda r: train(r, "../elsewhere"), IDFuseInputError, ("save_name", "../elsewhere")),
    Mistake("Face Embed", "a photo without a face",
            face_embed_without_face, NoFaceError, ("photo 1 of 1",)),
]


@pytest.mark.parametrize("case", MISTAKES, ids=lambda m: f"{m.node}: {m.mistake}")
def test_user_mistake_names_the_input(case, request):
    with pytest.raises(IDFuseError) as caught:
        case.make(request)
    assert isinstance(caught.value, case.error), f"{type(caught.value).__name__}: {caught.value}"
    message = str(caught.value)
    for name in case.names:
        # As a whole word: "text" in "text encoder" would not name the input text.
        assert re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message), f"{name!r} not in: {message}"


def test_every_node_with_a_documented_mistake_is_a_node():
    titles = set(NODE_DISPLAY_NAME_MAPPINGS.values())
    assert {f"IDFuse {m.node}" for m in MISTAKES} <= titles
