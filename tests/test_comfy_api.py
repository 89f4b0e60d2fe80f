"""Guard: the ComfyUI APIs the pack relies on still have the shape it expects, on whatever ComfyUI the
harness found (the pinned late-2024 core, or COMFYUI_PATH).

Each failure names the API, what the pack expects and where the pack uses it (found in the current
tree, so the messages stay right while modules move). Three kinds of checks:

- call shapes: the pack's call (positional count, keyword names) must bind to the signature;
- behaviour: attention patch and replace conventions, ``extra_options`` keys, ``model_sampling``,
  ``ProgressBar`` hooks, interrupts, CLIP/VAE/LoRA helpers, run on the tests' tiny models;
- coverage: every ``comfy.*`` / ``folder_paths.*`` name the pack's sources use is checked here.

Pack objects are found by reading the current tree (``pack_object``), not imported by path.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import comfy_env
import pytest
import torch

PACK_ROOT = comfy_env.PACK_ROOT
# Sources whose ComfyUI use the guard covers: the pack (nodes, models, bench) and the tests' helpers.
SKIPPED_DIRS = {"tests", ".git", "__pycache__", "docs", "web"}
SUPPORT_DIR = PACK_ROOT / "tests" / "support"


# --- reading the current tree -----------------------------------------------------------------


@cache
def _sources() -> dict[Path, str]:
    """The pack's sources and the tests' helpers: what the coverage check reads."""
    files = [p for p in PACK_ROOT.rglob("*.py")
             if not SKIPPED_DIRS & set(p.relative_to(PACK_ROOT).parts[:-1])]
    files += sorted(SUPPORT_DIR.glob("*.py"))
    return {p: p.read_text(encoding="utf-8") for p in sorted(set(files))}


@cache
def _all_sources() -> dict[Path, str]:
    """Also the tests (some APIs only they use), except this file."""
    tests = [p for p in (PACK_ROOT / "tests").rglob("test_*.py") if p.resolve() != Path(__file__).resolve()]
    return {**_sources(), **{p: p.read_text(encoding="utf-8") for p in sorted(tests)}}


def usage(token: str, limit: int = 4) -> str:
    """Where the sources mention ``token``: 'path:line' entries, or a note that nothing does."""
    hits = []
    for path, text in _all_sources().items():
        for number, line in enumerate(text.splitlines(), 1):
            if token in line:
                hits.append(f"{path.relative_to(PACK_ROOT)}:{number}")
    if not hits:
        return f"(no source mentions '{token}')"
    more = f" and {len(hits) - limit} more" if len(hits) > limit else ""
    return ", ".join(hits[:limit]) + more


def pack_object(name: str):
    """A top-level class/function/constant of the pack, wherever the current tree defines it."""
    for path, text in _sources().items():
        if path.is_relative_to(SUPPORT_DIR):
            continue
        tree = ast.parse(text)
        for node in tree.body:
            names = ([node.name] if isinstance(node, (ast.ClassDef, ast.FunctionDef))
                     else [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)])
            if name in names:
                parts = path.relative_to(PACK_ROOT).with_suffix("").parts
                module = ".".join((comfy_env.PACKAGE_NAME, *(p for p in parts if p != "__init__")))
                return getattr(importlib.import_module(module), name)
    pytest.fail(f"The pack defines no '{name}' any more; update tests/test_comfy_api.py to its new name.")


def _resolve(dotted: str):
    """Import the longest module prefix of ``dotted`` and walk the attributes after it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(dotted)


def _is_real_folder_paths() -> bool:
    import folder_paths

    return not getattr(folder_paths, "__file__", "").startswith(str(SUPPORT_DIR))


# --- call shapes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """The pack calls ``name`` with ``args`` positional arguments (after self) and these keywords."""

    name: str
    args: int = 0
    keywords: tuple[str, ...] = ()
    token: str = ""  # what to look for in the sources (default: the last name component)
    method: bool = False  # an instance method: bound with a stand-in for self
    optional: bool = False  # absent in some ComfyUI versions; the pack checks with hasattr
    needs_full: bool = False  # only in a full ComfyUI checkout (folder_paths, nodes, comfy_extras)

    @property
    def where(self) -> str:
        return usage(self.token or self.name.rsplit(".", 1)[-1])

    def expectation(self) -> str:
        shown = [f"arg{i + 1}" for i in range(self.args)] + [f"{k}=…" for k in self.keywords]
        return f"{self.name}({', '.join(shown)})"


MM, MP, UT, SA = "comfy.model_management", "comfy.model_patcher.ModelPatcher", "comfy.utils", "comfy.samplers"
CALLS: tuple[Call, ...] = (
    Call(f"{MM}.load_models_gpu", 1, ("force_full_load",)),
    Call(f"{MM}.throw_exception_if_processing_interrupted"),
    Call(f"{MM}.interrupt_current_processing", 1),
    Call(f"{MM}.processing_interrupted"),
    Call(f"{MM}.get_torch_device"),
    Call(f"{MM}.should_use_fp16", 1),
    Call(f"{MM}.unet_offload_device"),
    Call(f"{MM}.intermediate_device"),
    Call(f"{MM}.soft_empty_cache"),
    Call(f"{MM}.unload_all_models"),
    Call(MP, 1, ("load_device", "offload_device"), token="ModelPatcher("),
    Call(f"{MP}.clone", token="model.clone()", method=True),
    Call(f"{MP}.set_model_attn2_patch", 1, method=True),
    Call(f"{MP}.set_model_attn2_replace", 4, method=True),  # patch, block name, block id, transformer index
    Call(f"{MP}.set_model_attn1_replace", 4, method=True),
    Call(f"{MP}.set_model_unet_function_wrapper", 1, method=True),  # IDFuse Attention Map's per-call recording
    Call(f"{MP}.get_model_object", 1, method=True),
    Call(f"{MP}.add_patches", 2, method=True),
    Call(f"{MP}.set_model_compute_dtype", 1, method=True, optional=True),
    Call("comfy.ldm.modules.attention.optimized_attention", 4, ("attn_precision",)),
    Call(f"{UT}.ProgressBar", 1),
    Call(f"{UT}.ProgressBar.update_absolute", 3, method=True),
    Call(f"{UT}.set_progress_bar_global_hook", 1),
    Call(f"{UT}.load_torch_file", 1),
    Call(f"{SA}.CFGGuider", 1, token="CFGGuider"),
    Call(f"{SA}.CFGGuider.set_conds", 2, method=True),
    Call(f"{SA}.CFGGuider.set_cfg", 1, method=True),
    Call(f"{SA}.CFGGuider.sample", 8, method=True, token="super().sample("),  # the guider's positional call
    Call(f"{SA}.KSampler", 1, ("steps", "device", "sampler", "scheduler", "denoise", "model_options")),
    Call(f"{SA}.sampler_object", 1),
    Call(f"{SA}.calculate_sigmas", 3),
    Call("comfy.sample.fix_empty_latent_channels", 2),
    Call("comfy.sample.prepare_noise", 3),
    Call("comfy.sample.sample", 9, ("disable_pbar", "seed"), token="comfy.sample.sample("),
    Call("comfy.sample.sample_custom", 8, ("disable_pbar", "seed")),
    Call("comfy.lora.model_lora_keys_unet", 2),
    Call("comfy.lora.load_lora", 2),
    Call("comfy.sd.VAE", 0, ("sd", "config", "dtype"), token="comfy.sd.VAE("),
    Call("comfy.sd.VAE.encode", 1, method=True, token="vae.encode("),
    Call("comfy.sd.CLIP", 1, ("embedding_directory", "model_options"), token="comfy.sd.CLIP("),
    Call("comfy.sd.CLIP.tokenize", 1, method=True, token=".tokenize("),
    Call("comfy.sd.CLIP.encode_from_tokens", 1, ("return_pooled",), method=True),
    Call("comfy.model_base.BaseModel.apply_model", 2, ("c_crossattn", "transformer_options", "y"), method=True),
    Call("comfy.model_base.BaseModel.extra_conds", 0, ("width", "height", "device", "pooled_output"), method=True),
    Call("comfy.model_base.BaseModel.process_latent_in", 1, method=True),
    Call("comfy.model_base.BaseModel.get_dtype", method=True),
    Call("comfy.clip_vision.ClipVisionModel.encode_image", 1, method=True),
    Call("comfy.clip_vision.load", 1, token="comfy.clip_vision.load("),
    Call("comfy.sd.load_checkpoint_guess_config", 1, ("output_vae", "output_clip")),
    Call("comfy.sd.save_checkpoint", 2),  # the tests' tiny checkpoint files (tests/support/tiny_checkpoint.py)
    Call("comfy.utils.state_dict_prefix_replace", 2, ("filter_keys",)),  # prepare_faces --vae from a checkpoint
    Call("comfy.k_diffusion.sampling.default_noise_sampler", 1),
    Call("comfy.k_diffusion.sampling.BrownianTreeNoiseSampler", 3, ("seed", "cpu")),
    Call("folder_paths.get_filename_list", 1, needs_full=True),
    Call("folder_paths.get_full_path", 2, needs_full=True),
    Call("folder_paths.get_folder_paths", 1, needs_full=True),
    Call("folder_paths.get_input_directory", 0, needs_full=True),  # IDFuse Load Training Photos' folders
    Call("folder_paths.add_model_folder_path", 2, ("is_default",), needs_full=True),
)

# Names the pack uses as values (classes it subclasses or instantiates elsewhere, constants, modules'
# attributes), checked for existence here and for behaviour in the tests below.
ATTRIBUTES: tuple[str, ...] = (
    f"{MM}.InterruptProcessingException",
    f"{SA}.KSampler.SAMPLERS", f"{SA}.KSampler.SCHEDULERS", f"{SA}.KSAMPLER",
    f"{UT}.PROGRESS_BAR_HOOK",
    "comfy.model_base.BaseModel", "comfy.model_base.SDXL", "comfy.model_base.ModelType",
    "comfy.supported_models.SD15", "comfy.supported_models.SDXL",
    "comfy.sd1_clip.SDTokenizer", "comfy.sd1_clip.SDClipModel", "comfy.sd1_clip.SD1ClipModel",
    "comfy.sd1_clip.SD1Tokenizer", "comfy.sdxl_clip.SDXLClipModel", "comfy.sdxl_clip.SDXLTokenizer",
    "comfy.ldm.models.autoencoder.AutoencoderKL", "comfy.sd.load_lora_for_models",
    "comfy.options.enable_args_parsing", "comfy.cli_args",
    "comfy.supported_models.models",  # the tests register their tiny UNet's config there
)
FULL_ONLY_ATTRIBUTES: tuple[str, ...] = (
    "folder_paths.models_dir", "folder_paths.folder_names_and_paths",
    "nodes.CLIPTextEncode", "nodes.VAEEncode", "comfy_extras.nodes_train.TrainLoraNode",
)


def _call_id(call: Call) -> str:
    return call.name.replace("comfy.", "")


@pytest.mark.parametrize("call", CALLS, ids=_call_id)
def test_call_shapes(call: Call, comfy_install):
    if call.needs_full and not _is_real_folder_paths():
        pytest.skip("the late-2024 core has no folder_paths; the tests use their own stand-in")
    try:
        target = _resolve(call.name)
    except (ImportError, AttributeError) as e:
        if call.optional:
            pytest.skip(f"{call.name} is absent in this ComfyUI; the pack checks for it ({call.where})")
        pytest.fail(f"{call.name} is missing in ComfyUI at {comfy_install.root} ({e}). The pack calls "
                    f"{call.expectation()} in {call.where}.")
    signature = inspect.signature(target)
    placeholders = [object()] * (call.args + (1 if call.method else 0))
    try:
        signature.bind(*placeholders, **{k: object() for k in call.keywords})
    except TypeError as e:
        pytest.fail(f"{call.name} changed shape: it is now {call.name}{signature} ({e}). The pack calls "
                    f"{call.expectation()} in {call.where}.")


@pytest.mark.parametrize("name", ATTRIBUTES + FULL_ONLY_ATTRIBUTES, ids=lambda n: n.replace("comfy.", ""))
def test_names_exist(name: str, comfy_install):
    if name in FULL_ONLY_ATTRIBUTES and not comfy_install.is_full:
        pytest.skip("needs a full ComfyUI checkout")
    if name.startswith("folder_paths.") and not _is_real_folder_paths():
        pytest.skip("the tests' folder_paths stand-in is in use")
    try:
        _resolve(name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{name} is missing in ComfyUI at {comfy_install.root} ({e}); the pack uses it in "
                    f"{usage(name.rsplit('.', 1)[-1])}.")


# --- coverage: every comfy name in the sources is checked above ---------------------------------


ROOTS = ("comfy", "comfy_extras", "folder_paths", "nodes")


def _used_names(path: Path, text: str) -> set[str]:
    """Dotted ComfyUI names a source file uses: ``import``ed names and ``comfy.x.y`` attribute chains."""
    tree = ast.parse(text)
    aliases: dict[str, str] = {}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in ROOTS:  # the pack's own nodes/ is imported relatively, so "nodes" is ComfyUI's
                    aliases[alias.asname or root] = alias.name if alias.asname else root
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in ROOTS:
                found.update(f"{node.module}.{a.name}" for a in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, inner = [], node
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in aliases:
                found.add(".".join([aliases[inner.id], *reversed(chain)]))
    return found


def _longest_chains(names: set[str]) -> set[str]:
    return {n for n in names if not any(other.startswith(n + ".") for other in names)}


def test_every_comfy_name_the_sources_use_is_checked():
    checked = {c.name for c in CALLS} | set(ATTRIBUTES) | set(FULL_ONLY_ATTRIBUTES)
    modules = {n.rsplit(".", 1)[0] for n in checked}
    missing = {}
    for path, text in _sources().items():
        for name in _longest_chains(_used_names(path, text)):
            if name in checked or name in modules or any(name.startswith(c + ".") for c in checked):
                continue
            missing.setdefault(name, []).append(str(path.relative_to(PACK_ROOT)))
    assert not missing, ("ComfyUI names used by the pack but not guarded in tests/test_comfy_api.py (add a Call "
                         "or ATTRIBUTES entry): " + "; ".join(f"{n} in {', '.join(p)}" for n, p in sorted(missing.items())))


def test_every_guarded_name_is_still_used():
    unused = [c.name for c in CALLS if c.where.startswith("(no source")]
    unused += [n for n in ATTRIBUTES + FULL_ONLY_ATTRIBUTES if usage(n.rsplit(".", 1)[-1]).startswith("(no source")]
    assert not unused, f"Guarded ComfyUI names no source uses any more (drop them from tests/test_comfy_api.py): {unused}"


# --- behaviour ----------------------------------------------------------------------------------


def _keys_read_from_extra_options() -> tuple[set[str], set[str]]:
    """Keys the pack's patches read: ``extra_options["k"]`` (required) and ``extra_options.get("k")``."""
    required, optional = set(), set()
    for path, text in _sources().items():
        if path.is_relative_to(SUPPORT_DIR):
            continue
        required |= set(re.findall(r"extra_options\[\s*[\"'](\w+)[\"']\s*\]", text))
        optional |= set(re.findall(r"extra_options\.get\(\s*[\"'](\w+)[\"']", text))
    return required, optional


class _Recorder:
    """A patch that records how ComfyUI calls it. Shared by clones, as the pack's patches are."""

    def __init__(self, kind: str, calls: list, attention=None):
        self.kind, self.calls, self.attention = kind, calls, attention

    def __deepcopy__(self, memo):
        return self

    def __call__(self, *args):
        self.calls.append((self.kind, args))
        if self.kind == "attn2_patch":
            n, context, value, _extra = args
            return n, context, value
        q, k, v, extra = args
        return self.attention(q, k, v, extra["n_heads"])


@pytest.fixture(scope="module")
def sd15():
    from factories import make_model

    return make_model("sd15")


@pytest.fixture(scope="module")
def recorded_sampling(sd15):
    """One euler step with cfg on a tiny SD1.5 UNet, an attn2 patch, an attn2 replace on one layer per
    block kind and an attn1 replace on one layer."""
    from comfy.ldm.modules.attention import optimized_attention
    from factories import sample

    block_keys = pack_object("block_keys")
    model = sd15
    patched = model.clone()
    calls: list = []
    keys = {k.block: k for k in block_keys("sd15")}  # one layer per block kind: input, middle, output
    patched.set_model_attn2_patch(_Recorder("attn2_patch", calls))
    for key in keys.values():
        patched.set_model_attn2_replace(_Recorder("attn2_replace", calls, optimized_attention), *key.key)
    patched.set_model_attn1_replace(_Recorder("attn1_replace", calls, optimized_attention), *keys["input"].key)
    cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
    sample(patched, [[cond, {}]], [[cond * 0, {}]], steps=1, cfg=4.0, size=16)
    return {"model": model, "patched": patched, "calls": calls, "keys": keys, "cond": cond}


def test_clone_shares_the_unet_and_copies_the_options(recorded_sampling):
    model, patched = recorded_sampling["model"], recorded_sampling["patched"]
    where = usage("model.clone()")
    assert patched.model is model.model, (
        f"ModelPatcher.clone no longer shares the model: the pack expects clone().model to be the input's model "
        f"(its LoRA hooks and training aliases act on the shared UNet), used in {where}.")
    assert "patches" not in model.model_options.get("transformer_options", {}), (
        f"ModelPatcher.clone no longer copies model_options: patching a clone changed the input MODEL; the pack "
        f"expects the input untouched, used in {where}.")
    replaced = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    key = recorded_sampling["keys"]["input"].key
    assert key in replaced, (
        f"set_model_attn2_replace no longer stores patches under model_options['transformer_options']"
        f"['patches_replace']['attn2'][(block, id, index)]; it holds {list(replaced)}. The pack reads that "
        f"structure in {usage('patches_replace')}.")


def test_attn2_patch_convention(recorded_sampling):
    calls = [args for kind, args in recorded_sampling["calls"] if kind == "attn2_patch"]
    where = usage("set_model_attn2_patch")
    assert calls, f"An attn2_patch set with set_model_attn2_patch was never called; the pack uses one in {where}."
    for n, context, value, extra in calls:
        assert n.ndim == 3 and context.shape[-1] == 768 and value.shape == context.shape, (
            f"attn2_patch is called as patch(n, context, value, extra_options) with n (B, tokens, C) and the "
            f"text context (B, 77, 768) as context and value; got shapes {n.shape}, {context.shape}, "
            f"{value.shape}. Used in {where}.")
        assert isinstance(extra, dict), f"attn2_patch's 4th argument is no longer the extra_options dict ({where})."


@pytest.mark.parametrize("kind", ["attn2_replace", "attn1_replace"])
def test_replace_convention_and_the_extra_options_the_pack_reads(recorded_sampling, kind):
    calls = [args for k, args in recorded_sampling["calls"] if k == kind]
    where = usage(f"set_model_{kind}")
    assert calls, f"An {kind} patch was never called; the pack registers them in {where}."
    required, _optional = _keys_read_from_extra_options()
    attention_keys = {k.key for k in recorded_sampling["keys"].values()}
    for q, k, v, extra in calls:
        assert q.ndim == 3 and k.ndim == 3 and v.shape == k.shape and q.shape[-1] == k.shape[-1], (
            f"{kind} is called as f(q, k, v, extra_options) with projected q (B, N, inner) and k, v (B, L, inner);"
            f" got {q.shape}, {k.shape}, {v.shape}. The pack's replace patches rely on it ({where}).")
        missing = sorted(required - set(extra))
        assert not missing, (f"{kind}: extra_options lacks {missing}, which the pack reads "
                             f"({'; '.join(usage(f'extra_options[{chr(34)}{m}{chr(34)}]') for m in missing)}). "
                             f"ComfyUI gives {sorted(extra)}.")
        key = (*extra["block"], extra["block_index"])
        assert key in attention_keys, (f"{kind}: extra_options block/block_index give {key}, not one of the keys the "
                                       f"patch was registered under {sorted(attention_keys)}; the pack's block table "
                                       f"(models/unet.py) uses ComfyUI's (name, id, index) keys.")
        assert list(extra["original_shape"][-2:]) == [16, 16], (
            f"{kind}: extra_options['original_shape'] is {extra['original_shape']}, expected the latent's shape "
            f"[B, C, 16, 16]; the attention-loss probes derive each layer's grid from it ({usage('original_shape')}).")
        chunks = extra["cond_or_uncond"]
        assert chunks and set(chunks) <= {0, 1} and q.shape[0] % len(chunks) == 0, (
            f"{kind}: extra_options['cond_or_uncond'] is {chunks!r}, expected one 0 (cond) / 1 (uncond) entry per "
            f"equal batch chunk of {q.shape[0]} rows ({usage('cond_or_uncond')}).")
        assert torch.is_tensor(extra["sigmas"]) and extra["sigmas"].numel() >= 1, (
            f"{kind}: extra_options['sigmas'] is {extra['sigmas']!r}, expected the step's sigma tensor "
            f"({usage('sigmas')}).")
        if kind == "attn2_replace":
            to_k = recorded_sampling["model"].model.diffusion_model.get_submodule(
                pack_object("cross_attention_path")(recorded_sampling["model"].model.diffusion_model,
                                                    next(b for b in recorded_sampling["keys"].values() if b.key == key))
            ).to_k
            assert k.shape[-1] == to_k.out_features, (
                f"attn2_replace: k is {k.shape[-1]} wide, expected to_k's output width {to_k.out_features} (already "
                f"projected); the pack's probes and ID attention rely on it ({where}).")


def test_custom_transformer_options_reach_the_patches(sd15):
    """The trainer calls apply_model itself and passes its values context in transformer_options."""
    model = sd15.clone()
    seen = []

    class Observe:
        def __deepcopy__(self, memo):
            return self

        def __call__(self, n, context, value, extra_options):
            seen.append(extra_options.get("idfuse_api_check"))
            return n, context, value

    model.set_model_attn2_patch(Observe())
    options = dict(model.model_options["transformer_options"])
    options.update({"idfuse_api_check": "passed", "cond_or_uncond": [0], "sigmas": torch.tensor([1.0])})
    x = torch.zeros(1, 4, 8, 8)
    with torch.no_grad():
        out = model.model.apply_model(x, torch.tensor([1.0]), c_crossattn=torch.zeros(1, 77, 768),
                                      transformer_options=options)
    where = usage("apply_model(")
    assert out.shape == x.shape, f"BaseModel.apply_model returned {tuple(out.shape)} for {tuple(x.shape)} ({where})."
    assert seen and all(s == "passed" for s in seen), (
        f"Keys the caller puts into transformer_options no longer reach extra_options of attn2 patches (saw {seen[:3]});"
        f" the trainer passes its values context that way ({where}, {usage('VALUES_CONTEXT')}).")


def test_unet_function_wrapper_convention(sd15):
    """IDFuse Attention Map records through a model function wrapper that adds a per-call attn2 patch."""
    from factories import sample

    model = sd15.clone()
    seen: list = []
    reached: list = []

    class Observe:
        def __deepcopy__(self, memo):
            return self

        def __call__(self, n, context, value, extra_options):
            reached.append(True)
            return n, context, value

    def wrapper(apply_model, args):
        seen.append(sorted(args))
        options = args["c"]["transformer_options"]
        c = dict(args["c"])
        c["transformer_options"] = dict(options)
        patches = dict(options.get("patches", {}))
        patches["attn2_patch"] = [*patches.get("attn2_patch", []), Observe()]
        c["transformer_options"]["patches"] = patches
        return apply_model(args["input"], args["timestep"], **c)

    model.set_model_unet_function_wrapper(wrapper)
    positive = [[torch.zeros(1, 77, 768), {}]]
    negative = [[torch.zeros(1, 77, 768), {}]]
    sample(model, positive, negative, steps=1)
    where = usage("set_model_unet_function_wrapper")
    assert seen and seen[0] == ["c", "cond_or_uncond", "input", "timestep"], (
        f"model_function_wrapper is no longer called as wrapper(apply_model, {{'input', 'timestep', 'c', "
        f"'cond_or_uncond'}}); got keys {seen[:1]}. IDFuse Attention Map relies on it ({where}).")
    assert reached, (f"An attn2_patch added to c['transformer_options']['patches'] inside a model function wrapper "
                     f"no longer reaches the transformer blocks; IDFuse Attention Map records that way ({where}).")


# extra_conds does not depend on the UNet's depth: an SDXL with one transformer per attention block.
SHALLOW_SDXL = {"transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
                "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1]}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_extra_conds(family, sd15):
    from factories import make_model

    model = sd15 if family == "sd15" else make_model("sdxl", **SHALLOW_SDXL)
    kwargs = {"width": 64, "height": 64, "device": torch.device("cpu")}
    if family == "sdxl":
        kwargs["pooled_output"] = torch.zeros(1, 1280)
    conds = model.model.extra_conds(**kwargs)
    where = usage("extra_conds(")
    assert set(conds) <= {"y"}, (f"BaseModel.extra_conds({', '.join(kwargs)}) of a plain {family} model now gives "
                                 f"{sorted(conds)}; the trainer accepts only 'y' ({where}).")
    if family == "sdxl":
        assert conds["y"].cond.shape == (1, 2816), (
            f"SDXL extra_conds['y'].cond is {tuple(conds['y'].cond.shape)}, expected (1, 2816) ({where}).")


def test_model_sampling(sd15):
    sampling = sd15.get_model_object("model_sampling")
    where = usage("model_sampling")
    for name in ("sigma", "timestep", "percent_to_sigma", "noise_scaling", "calculate_denoised", "sigmas"):
        assert hasattr(sampling, name), f"model_sampling has no '{name}' any more; the pack uses it ({usage(name)})."
    assert sampling.sigmas.shape == (1000,), f"model_sampling.sigmas is {tuple(sampling.sigmas.shape)}, expected (1000,)."
    timesteps = torch.tensor([0.0, 400.0, 999.0])
    sigma = sampling.sigma(timesteps)
    torch.testing.assert_close(sampling.timestep(sigma).float(), timesteps, atol=0.5, rtol=0,
                               msg=f"model_sampling.timestep(sigma(t)) no longer gives t back ({where}).")
    assert float(sampling.percent_to_sigma(0.0)) > float(sampling.percent_to_sigma(1.0)), (
        f"model_sampling.percent_to_sigma(0) should be the largest sigma, (1) the smallest ({usage('percent_to_sigma')}).")
    x0, noise = torch.ones(3, 4, 2, 2), torch.full((3, 4, 2, 2), 2.0)
    noisy = sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)
    torch.testing.assert_close(noisy, x0 + sigma.view(-1, 1, 1, 1) * noise,
                               msg=f"noise_scaling(sigma, noise, x0) of an eps model is no longer x0 + sigma·noise ({where}).")
    denoised = sampling.calculate_denoised(sigma, torch.zeros_like(noisy), noisy)
    assert denoised.shape == noisy.shape, f"calculate_denoised(sigma, output, input) changed shape ({where})."


def test_optimized_attention_matches_softmax_attention():
    from comfy.ldm.modules.attention import optimized_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 7, 16, generator=gen), torch.randn(2, 7, 16, generator=gen)
    out = optimized_attention(q, k, v, 2, attn_precision=None)
    qh, kh, vh = (t.view(2, -1, 2, 8).transpose(1, 2) for t in (q, k, v))
    expected = ((qh @ kh.transpose(-1, -2) / 8 ** 0.5).softmax(-1) @ vh).transpose(1, 2).reshape(2, 5, 16)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5, msg=(
        f"optimized_attention(q, k, v, heads) with (B, N, heads·d) tensors no longer computes softmax attention "
        f"in that layout; the pack's patches call it so ({usage('optimized_attention')})."))


def test_progress_bar_reaches_the_global_hook():
    import comfy.utils

    seen = []
    saved = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, *args, **kwargs: seen.append((value, total, preview)))
    try:
        bar = comfy.utils.ProgressBar(10)
        bar.update_absolute(3, 10, ("JPEG", None, 512))
    finally:
        comfy.utils.set_progress_bar_global_hook(saved)
    assert seen == [(3, 10, ("JPEG", None, 512))], (
        f"ProgressBar(total).update_absolute(value, total, preview) no longer calls the global progress hook with "
        f"(value, total, preview) (saw {seen}); the trainer reports steps and loss previews so, and the tests' "
        f"interrupts count steps there ({usage('ProgressBar(')}).")


def test_interrupt_flag_raises_once():
    import comfy.model_management as mm

    where = usage("InterruptProcessingException")
    mm.interrupt_current_processing()
    try:
        assert mm.processing_interrupted()
        with pytest.raises(mm.InterruptProcessingException):
            mm.throw_exception_if_processing_interrupted()
        assert not mm.processing_interrupted(), (
            f"throw_exception_if_processing_interrupted no longer clears the interrupt flag ({where}).")
        mm.throw_exception_if_processing_interrupted()  # cleared: no second exception
    finally:
        mm.interrupt_current_processing(False)


def test_clip_tokens_embeddings_and_spliced_vectors(tokenizer_dir):
    from factories import make_clip

    clip = make_clip("sd15", tokenizer_dir)
    tokens = clip.tokenize("a photo of sks person")
    where = usage(".tokenize(")
    assert set(tokens) == {"l"} and len(tokens["l"]) == 1 and len(tokens["l"][0]) == 77, (
        f"CLIP.tokenize now gives {type(tokens).__name__} with keys {list(tokens)[:3]}; the pack expects "
        f"{{'l': [[(token_id, weight, ...) * 77]]}} for SD1.5 ({where}).")
    first = tokens["l"][0][1]
    assert isinstance(first[0], int) and isinstance(first[1], float), (
        f"CLIP.tokenize entries are now {first!r}; the pack expects (token_id: int, weight: float, ...) ({where}).")
    embedding = clip.cond_stage_model.clip_l.transformer.get_input_embeddings()
    assert isinstance(embedding, torch.nn.Embedding) and embedding.weight.shape[-1] == 768, (
        f"CLIP.cond_stage_model.clip_l.transformer.get_input_embeddings() is {embedding!r}; the trainer hooks the "
        f"token embedding there ({usage('get_input_embeddings')}).")
    with torch.no_grad():
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        vector = torch.randn(768, generator=torch.Generator().manual_seed(0))
        spliced = {"l": [[(vector, *t[1:]) if t[0] == first[0] else t for t in tokens["l"][0]]]}
        spliced_cond = clip.encode_from_tokens(spliced)
    assert cond.shape == (1, 77, 768), f"CLIP.encode_from_tokens gives {tuple(cond.shape)}, expected (1, 77, 768)."
    assert pooled is not None, "CLIP.encode_from_tokens(return_pooled=True) gave no pooled output."
    assert spliced_cond.shape == cond.shape and not torch.equal(spliced_cond, cond), (
        f"A tensor in place of a token id no longer changes CLIP's encoding (word vectors spliced into prompts); "
        f"IDFuse Encode With ID relies on it ({usage('encode_from_tokens(spliced')}).")
    assert hasattr(clip, "patcher") and hasattr(clip.patcher, "model_options"), (
        f"CLIP.patcher is no longer a ModelPatcher; the trainer loads it with load_models_gpu ({usage('clip.patcher')}).")


def test_vae_encode_and_latent_scaling(sd15):
    from factories import tiny_vae

    vae = tiny_vae()
    with torch.no_grad():
        latent = vae.encode(torch.rand(1, 64, 64, 3))
    assert tuple(latent.shape) == (1, 4, 8, 8), (
        f"VAE.encode of IMAGE (B, H, W, 3) gave {tuple(latent.shape)}, expected (B, 4, H/8, W/8); the trainer "
        f"encodes its photos so ({usage('vae.encode(')}).")
    assert hasattr(vae, "first_stage_model"), "VAE.first_stage_model is gone; the tests' interrupts hook it."
    scaled = sd15.model.process_latent_in(latent.float())
    assert scaled.shape == latent.shape, f"process_latent_in changed the latent's shape ({usage('process_latent_in')})."


def test_lora_key_map_loading_and_patches(sd15):
    import comfy.lora

    block_keys, cross_attention_path = pack_object("block_keys"), pack_object("cross_attention_path")
    model = sd15
    unet = model.model.diffusion_model
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    kohya = {weight: name for name, weight in key_map.items()
             if isinstance(weight, str) and name.startswith("lora_unet_")}
    layer = block_keys("sd15")[0]
    weight_key = f"diffusion_model.{cross_attention_path(unet, layer)}.to_k.weight"
    assert weight_key in kohya, (
        f"comfy.lora.model_lora_keys_unet no longer maps a 'lora_unet_…' name to {weight_key}; the pack names its "
        f"LoRA files' keys with it ({usage('model_lora_keys_unet')}).")
    to_k = unet.get_submodule(cross_attention_path(unet, layer)).to_k
    name = kohya[weight_key]
    state = {f"{name}.lora_down.weight": torch.zeros(2, to_k.in_features),
             f"{name}.lora_up.weight": torch.zeros(to_k.out_features, 2), f"{name}.alpha": torch.tensor(2.0)}
    patches = comfy.lora.load_lora(state, key_map)
    assert weight_key in patches, (f"comfy.lora.load_lora(state_dict, key_map) no longer gives patches keyed by the "
                                   f"weight key ({usage('load_lora(')}).")
    applied = model.clone().add_patches(patches, 1.0)
    assert len(applied) == 1, (f"ModelPatcher.add_patches(patches, strength) no longer returns the applied keys "
                               f"(got {applied!r}); the pack counts them ({usage('add_patches')}).")


def test_the_guider_override_matches_cfg_guider():
    import comfy.samplers

    ours = pack_object("TwoStreamGuider")
    theirs = list(inspect.signature(comfy.samplers.CFGGuider.sample).parameters)
    mine = list(inspect.signature(ours.sample).parameters)
    assert mine == theirs, (f"comfy.samplers.CFGGuider.sample{inspect.signature(comfy.samplers.CFGGuider.sample)} "
                            f"changed; the pack's override takes {mine} and passes them on positionally "
                            f"({usage('class TwoStreamGuider')}).")
    assert {"euler"} <= set(comfy.samplers.KSampler.SAMPLERS) and {"normal"} <= set(comfy.samplers.KSampler.SCHEDULERS)
