"""Random-weight checkpoints in the real single-file layouts (SD1.5, SDXL), for end-to-end tests.

The key names and shapes come from ComfyUI's own modules (the UNet through
``comfy.supported_models.SD15`` / ``SDXL``, the text encoders through the config's CLIP class:
CLIP-L, or CLIP-L + CLIP-G for SDXL; the VAE through ``AutoencoderKL``), built on the meta
device in a subprocess running the full ComfyUI with this interpreter, so the test process
never imports ``comfy``. The keys are renamed as ComfyUI's checkpoint saving does, and the
subprocess checks that ComfyUI's model detection recognises the layout as the family asked for.

The file is streamed tensor by tensor (in chunks) into safetensors' format: memory stays
small although the files are ~2.1 GB (SD1.5) and ~6.9 GB (SDXL) in fp16.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .locate import full_comfyui

log = logging.getLogger(__name__)

NORMAL_STD = 0.02
CHUNK_ELEMENTS = 1 << 22  # 4 Mi values (16 MB of fp32) per generated chunk

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
}


@dataclass(frozen=True)
class TensorSpec:
    """One state-dict entry: its key, its shape and how to fill it (normal, ones or zeros)."""

    key: str
    shape: tuple[int, ...]
    init: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# Runs inside ``python -c`` with argv [comfy_root, family]; prints {"entries": [...], "detected": ..., "clip": ...}.
# The UNet, text encoders and VAE are built on the meta device and their state dicts renamed by the
# model config's own ``process_*_state_dict_for_saving`` (what ComfyUI's checkpoint saving does), so the
# keys are those of a real single file (SDXL's CLIP-G in OpenCLIP layout, q/k/v fused). Each tensor's fill
# is carried through the renaming by a one-element stand-in per key holding its fill code.
_TABLE_SCRIPT = r"""
import json, sys
comfy_root, family = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_root)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.model_detection
import comfy.supported_models
from comfy.ldm.models.autoencoder import AutoencoderKL

# detect_unet_config's answers for real SD1.5 and SDXL checkpoints (comfy/model_detection.py).
UNETS = {
    "sd15": ("SD15", {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }),
    "sdxl": ("SDXL", {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }),
}
# The SD VAE of comfy/sd.py (SDXL's VAE has the same layout; only its weights and latent scale differ).
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)
FILLS = ("normal", "ones", "zeros")


def fills(module):
    init = {}
    for module_name, sub in module.named_modules():
        tensors = list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False))
        for name, _ in tensors:
            key = module_name + "." + name if module_name else name
            if name == "bias":
                init[key] = "zeros"
            elif isinstance(sub, NORMS) and name == "weight":
                init[key] = "ones"
            else:
                init[key] = "normal"
    return init


def table(module, rename):
    # rename: the config's process_*_state_dict_for_saving; applied to the meta tensors (shapes) and
    # to one-element stand-ins holding each key's fill code (which fused or transposed keys keep).
    init = fills(module)
    state = dict(module.state_dict())
    codes = {key: torch.full([1] * t.dim(), float(FILLS.index(init.get(key, "normal"))))
             for key, t in module.state_dict().items()}
    state, codes = rename(state), rename(codes)
    entries = []
    for key, t in state.items():
        if not t.is_floating_point():
            continue  # SDXL's saver adds CLIP-L's int64 position_ids, which the loader does not use
        code = codes[key].unique()
        assert code.numel() == 1, key
        entries.append([key, list(t.shape), FILLS[int(code.item())]])
    return entries


config_name, unet_config = UNETS[family]
with torch.device("meta"):
    config = getattr(comfy.supported_models, config_name)(dict(unet_config))
    unet = config.get_model({}, "", device=torch.device("meta")).diffusion_model
    clip = config.clip_target().clip(device="meta", dtype=torch.float16)
    vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
entries = (table(unet, config.process_unet_state_dict_for_saving)
           + table(clip, config.process_clip_state_dict_for_saving)
           + table(vae, config.process_vae_state_dict_for_saving))
meta_sd = {key: torch.empty(shape, dtype=torch.float16, device="meta") for key, shape, _ in entries}
prefix = comfy.model_detection.unet_prefix_from_state_dict(meta_sd)
detected = comfy.model_detection.model_config_from_unet(meta_sd, prefix)
clip_target = detected.clip_target(state_dict=meta_sd) if detected is not None else None
json.dump({
    "entries": entries,
    "unet_prefix": prefix,
    "detected": type(detected).__name__ if detected is not None else None,
    "clip": clip_target.clip.__name__ if clip_target is not None else None,
}, sys.stdout)
"""

# Runs inside ``python -c`` with argv [comfy_root, checkpoint]: loads it as CheckpointLoaderSimple
# does, with every log record (DEBUG included) captured; prints a JSON report.
_LOAD_CHECK_SCRIPT = r"""
import json, logging, sys
comfy_root, checkpoint = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_root)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
records = []


class Capture(logging.Handler):
    def emit(self, record):
        records.append([record.levelname, record.getMessage()])


root = logging.getLogger()
root.setLevel(logging.DEBUG)
root.addHandler(Capture())
import comfy.sd
model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)
json.dump({
    "model_config": type(model.model.model_config).__name__,
    "clip": type(clip.cond_stage_model).__name__ if clip is not None else None,
    "vae": type(vae.first_stage_model).__name__ if vae is not None and vae.first_stage_model is not None else None,
    "records": records,
}, sys.stdout)
"""


def _run_comfy_script(script: str, comfy_root: Path, args: Sequence[str], python: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        [python, "-c", script, str(comfy_root), *args],
        cwd=comfy_root, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"ComfyUI helper failed (exit {result.returncode}):\n{result.stderr[-6000:]}")
    # ComfyUI may print to stdout while importing; the JSON is the last line.
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


@dataclass(frozen=True)
class Family:
    """A checkpoint family: the ComfyUI model config and text-encoder class its detection must answer."""

    label: str
    model_config: str
    clip: str


FAMILIES: dict[str, Family] = {
    "sd15": Family("SD1.5", "SD15", "SD1ClipModel"),
    "sdxl": Family("SDXL", "SDXL", "SDXLClipModel"),
}


@functools.lru_cache(maxsize=4)
def checkpoint_tensor_specs(family: str, comfy_root: Path, python: str = sys.executable) -> tuple[TensorSpec, ...]:
    """Keys, shapes and fills of a real single-file checkpoint of ``family`` (``FAMILIES``), sorted by key."""
    expected = FAMILIES[family]
    started = time.monotonic()
    answer = _run_comfy_script(_TABLE_SCRIPT, comfy_root, [family], python, timeout=600)
    if answer["detected"] != expected.model_config or answer["clip"] != expected.clip:
        raise RuntimeError(f"ComfyUI detects the generated layout as {answer['detected']} / {answer['clip']}, "
                           f"not {expected.model_config} / {expected.clip}")
    specs = tuple(sorted((TensorSpec(key, tuple(shape), init) for key, shape, init in answer["entries"]),
                         key=lambda spec: spec.key))
    log.info("%s key table: %d tensors, %.0f M values (%.1f s)", expected.label, len(specs),
             sum(spec.numel for spec in specs) / 1e6, time.monotonic() - started)
    return specs


def _header(specs: Sequence[TensorSpec], dtype: torch.dtype, metadata: dict[str, str]) -> bytes:
    item = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        size = spec.numel * item
        header[spec.key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes


def expected_size(specs: Sequence[TensorSpec], dtype: torch.dtype, metadata: dict[str, str]) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    return 8 + len(_header(specs, dtype, metadata)) + sum(spec.numel for spec in specs) * item


def write_random_safetensors(path: str | os.PathLike[str], specs: Sequence[TensorSpec],
                             dtype: torch.dtype = torch.float16, seed: int = 0, std: float = NORMAL_STD,
                             metadata: dict[str, str] | None = None) -> Path:
    """Stream random tensors (normal * ``std``; ones / zeros where asked) into a safetensors file.

    Written to ``<path>.partial`` and renamed, so a reader never sees half a file.
    """
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    header = _header(specs, dtype, dict(metadata or {"format": "pt"}))
    generator = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    with open(partial, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for spec in specs:
            remaining = spec.numel
            while remaining > 0:
                count = min(remaining, CHUNK_ELEMENTS)
                if spec.init == "normal":
                    chunk = torch.randn(count, generator=generator, dtype=torch.float32).mul_(std).to(dtype)
                elif spec.init == "ones":
                    chunk = torch.ones(count, dtype=dtype)
                else:
                    chunk = torch.zeros(count, dtype=dtype)
                handle.write(chunk.view(torch.uint8).numpy().data)
                remaining -= count
    os.replace(partial, target)
    log.info("wrote %s (%.2f GB) in %.1f s", target, target.stat().st_size / 1e9, time.monotonic() - started)
    return target


def _table_digest(specs: Sequence[TensorSpec]) -> str:
    text = json.dumps([[spec.key, list(spec.shape), spec.init] for spec in specs])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def write_random_checkpoint(path: str | os.PathLike[str], family: str, dtype: torch.dtype = torch.float16,
                            seed: int = 0, *, comfy_root: Path | None = None, python: str = sys.executable) -> Path:
    """Write a random-weight checkpoint that ``CheckpointLoaderSimple`` loads as ``family`` (sd15 or sdxl).

    ``comfy_root`` defaults to the full ComfyUI that ``comfy_env`` finds (``COMFYUI_PATH`` or an
    ancestor of the pack). Reuses ``path`` when it already holds this exact file (same key table,
    dtype and seed, recorded in the safetensors metadata, and the right size).
    """
    if comfy_root is None:
        location = full_comfyui()
        if location.path is None:
            raise RuntimeError(location.reason)
        comfy_root = location.path
    specs = checkpoint_tensor_specs(family, Path(comfy_root), python)
    metadata = {
        "format": "pt",
        "idfuse_e2e": f"random-{family}",
        "idfuse_e2e_layout": _table_digest(specs),
        "idfuse_e2e_fill": f"{SAFETENSORS_DTYPES[dtype]}-seed{seed}-std{NORMAL_STD}",
    }
    target = Path(path)
    if (target.is_file() and target.stat().st_size == expected_size(specs, dtype, metadata)
            and read_metadata(target) == metadata):
        log.info("reusing %s", target)
        return target
    return write_random_safetensors(target, specs, dtype=dtype, seed=seed, metadata=metadata)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (reads the header only)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return dict(header.get("__metadata__") or {})


def available_memory_gib() -> float | None:
    """MemAvailable of /proc/meminfo in GiB (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle)
    except OSError:
        return None
    return int(fields["MemAvailable"].split()[0]) / (1 << 20)


def resident_memory_gib(pid: int) -> float:
    """VmRSS of process ``pid`` in GiB (0 where /proc does not tell)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
    except OSError:
        return 0.0
    return int(fields.get("VmRSS", "0 kB").split()[0]) / (1 << 20)


@dataclass(frozen=True)
class LoadReport:
    """What ComfyUI made of a checkpoint: detected classes and every key complaint it logged."""

    model_config: str
    clip: str | None
    vae: str | None
    key_warnings: tuple[str, ...]


# Key complaints ComfyUI logs while loading a checkpoint (comfy/sd.py, comfy/model_base.py).
KEY_WARNING_PATTERN = re.compile(
    r"(unet missing|unet unexpected|Missing VAE keys|Leftover VAE keys|clip missing|clip unexpected"
    r"|left over keys)\s*[:{]?",
)
# ComfyUI filters these itself (no SD1.x checkpoint has them): not a problem of the file.
BENIGN_MISSING_CLIP_KEYS = frozenset({"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"})


def key_warnings(log_text: str) -> list[str]:
    """Lines reporting missing / unexpected / left-over state-dict keys, benign ones excepted."""
    found = []
    for line in log_text.splitlines():
        match = KEY_WARNING_PATTERN.search(line)
        if not match:
            continue
        if match.group(1) == "clip missing":
            listed = set(re.findall(r"'([^']+)'", line[match.end():]))
            if listed and listed <= BENIGN_MISSING_CLIP_KEYS:
                continue
        found.append(line.strip())
    return found


def check_checkpoint_loads(path: str | os.PathLike[str], comfy_root: Path, python: str = sys.executable,
                           timeout: float = 600) -> LoadReport:
    """Load ``path`` with ``comfy.sd.load_checkpoint_guess_config`` in a subprocess (DEBUG logging).

    ``key_warnings`` lists every missing / unexpected / left-over key message, including the
    DEBUG-level ones the server does not log by default, minus the two CLIP keys that no SD1.x
    file has and ComfyUI ignores itself.
    """
    answer = _run_comfy_script(_LOAD_CHECK_SCRIPT, comfy_root, [str(Path(path).resolve())], python, timeout)
    warnings = [line[:2000] for _level, message in answer["records"] for line in key_warnings(message)]
    return LoadReport(answer["model_config"], answer["clip"], answer["vae"], tuple(warnings))
