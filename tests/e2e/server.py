"""Run the pack inside a real ComfyUI server and talk to it over HTTP.

Plain helpers, no pytest here (the fixtures are in ``conftest.py``):

* :func:`find_full_comfyui` finds a full ComfyUI checkout (``COMFYUI_PATH``, or an ancestor
  ``ComfyUI/custom_nodes/<pack>``), :func:`missing_requirements` tells whether this interpreter
  can run it.
* :func:`prepare_base_dir` lays out an isolated ``--base-directory`` (models, input, output,
  temp, user, and ``custom_nodes/comfyui-idfuse`` -> the pack root).
* :class:`ComfyServer` starts ``main.py --cpu`` with this interpreter on a free loopback port,
  waits for ``/object_info``, and stops the whole process group.
* :class:`ComfyClient` queues prompts and waits for their history, raising an
  ``AssertionError`` subclass with the node, exception and traceback when execution fails.
* :func:`ui_to_api` converts a workflow saved by the ComfyUI frontend into the API format.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

PACK_ROOT = Path(__file__).resolve().parents[2]
# The pack as reached (not resolved): keeps ComfyUI/custom_nodes/<pack> visible when that is a symlink.
PACK_DIR_AS_SEEN = Path(os.path.abspath(__file__)).parents[2]
PACK_LINK_NAME = "comfyui-idfuse"
PACK_PYTHON_MODULE = f"custom_nodes.{PACK_LINK_NAME}"
LOOPBACK = "127.0.0.1"

# Distributions the server needs to start at all (import names differ; these are what pip sees).
# Optional ones ComfyUI itself tolerates (torchaudio, av, kornia, spandrel, ...) are left out.
ESSENTIAL_DISTRIBUTIONS = (
    "torch",
    "torchsde",
    "numpy",
    "einops",
    "transformers",
    "tokenizers",
    "safetensors",
    "aiohttp",
    "yarl",
    "PyYAML",
    "Pillow",
    "scipy",
    "tqdm",
    "psutil",
    "av",
    "requests",
    "comfyui-frontend-package",
)

_FULL_COMFY_FILES = ("main.py", "server.py", "nodes.py", "folder_paths.py")


# --------------------------------------------------------------------------------------------
# Finding ComfyUI
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComfyLocation:
    """Where a full ComfyUI is, or why there is none (``path`` is then ``None``)."""

    path: Path | None
    reason: str


def is_full_comfyui(path: Path) -> bool:
    """A checkout the server can run from: main.py, server.py, nodes.py, folder_paths.py, comfy/."""
    return all((path / name).is_file() for name in _FULL_COMFY_FILES) and (path / "comfy").is_dir()


def find_full_comfyui(pack_root: Path = PACK_DIR_AS_SEEN, environ: Mapping[str, str] | None = None) -> ComfyLocation:
    """``COMFYUI_PATH`` first, else an ancestor when the pack sits in ``ComfyUI/custom_nodes/<pack>``."""
    env = os.environ if environ is None else environ
    configured = env.get("COMFYUI_PATH")
    if configured:
        root = Path(configured).expanduser().resolve()
        if is_full_comfyui(root):
            return ComfyLocation(root, f"COMFYUI_PATH={configured}")
        return ComfyLocation(
            None,
            f"COMFYUI_PATH={configured} is not a full ComfyUI checkout "
            f"(needs {', '.join(_FULL_COMFY_FILES)} and comfy/)",
        )
    # The unresolved path keeps a symlinked custom_nodes/<pack> visible; the resolved one finds
    # a pack checked out in place.
    candidates = [Path(os.path.abspath(pack_root)), pack_root.resolve()]
    for candidate in candidates:
        for parent in candidate.parents:
            if parent.name == "custom_nodes" and is_full_comfyui(parent.parent):
                return ComfyLocation(parent.parent, f"ancestor of the pack: {parent.parent}")
    return ComfyLocation(
        None,
        "no full ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout (main.py, server.py, "
        "nodes.py, folder_paths.py, comfy/) or put the pack in ComfyUI/custom_nodes/",
    )


def missing_requirements(distributions: Iterable[str] = ESSENTIAL_DISTRIBUTIONS) -> list[str]:
    """Distributions this interpreter lacks among those the server needs to start."""
    missing = []
    for name in distributions:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def supported_cli_flags(comfy_root: Path) -> set[str]:
    """The ``--flags`` that this ComfyUI's ``comfy/cli_args.py`` declares."""
    text = (comfy_root / "comfy" / "cli_args.py").read_text(encoding="utf-8")
    return set(re.findall(r"""add_argument\(\s*["'](--[A-Za-z0-9_-]+)["']""", text))


def comfyui_version(comfy_root: Path) -> str:
    version_file = comfy_root / "comfyui_version.py"
    if version_file.is_file():
        match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", version_file.read_text(encoding="utf-8"))
        if match:
            return match.group(1)
    return "unknown"


# --------------------------------------------------------------------------------------------
# The isolated base directory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerDirs:
    """The folders of one isolated server (everything ComfyUI writes lands under ``base``)."""

    base: Path

    @property
    def custom_nodes(self) -> Path:
        return self.base / "custom_nodes"

    @property
    def pack_link(self) -> Path:
        return self.custom_nodes / PACK_LINK_NAME

    @property
    def models(self) -> Path:
        return self.base / "models"

    @property
    def checkpoints(self) -> Path:
        return self.models / "checkpoints"

    @property
    def input(self) -> Path:
        return self.base / "input"

    @property
    def output(self) -> Path:
        return self.base / "output"

    @property
    def temp(self) -> Path:
        return self.base / "temp"

    @property
    def user(self) -> Path:
        return self.base / "user"

    @property
    def log_file(self) -> Path:
        return self.base / "server.log"

    def model_folder(self, kind: str) -> Path:
        """``models/<kind>`` (``checkpoints``, ``loras``, ``clip_vision``, ...), created on demand."""
        folder = self.models / kind
        folder.mkdir(parents=True, exist_ok=True)
        return folder


_MODEL_FOLDERS = ("checkpoints", "loras", "vae", "clip", "text_encoders", "clip_vision", "controlnet",
                  "diffusion_models", "embeddings", "upscale_models", "configs")


def prepare_base_dir(base: Path, pack_root: Path = PACK_ROOT) -> ServerDirs:
    """Create the folder layout and symlink the pack as ``custom_nodes/comfyui-idfuse``."""
    dirs = ServerDirs(base)
    for folder in (dirs.custom_nodes, dirs.input, dirs.output, dirs.temp, dirs.user):
        folder.mkdir(parents=True, exist_ok=True)
    for kind in _MODEL_FOLDERS:
        (dirs.models / kind).mkdir(parents=True, exist_ok=True)
    if not dirs.pack_link.is_symlink():
        dirs.pack_link.symlink_to(pack_root.resolve(), target_is_directory=True)
    return dirs


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 80) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# Key warnings in ComfyUI's log (comfy/sd.py, comfy/model_base.py)
# --------------------------------------------------------------------------------------------

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


def import_failures(log_text: str) -> list[str]:
    """Custom-node modules ComfyUI reported as failing to import."""
    failed = re.findall(r"\(IMPORT FAILED\):\s*(\S.*)$", log_text, flags=re.MULTILINE)
    failed += re.findall(r"Cannot import (\S+) module for custom nodes", log_text)
    return [item.strip() for item in failed]


# --------------------------------------------------------------------------------------------
# HTTP client
# --------------------------------------------------------------------------------------------


class PromptRejected(AssertionError):
    """``POST /prompt`` refused the graph (validation errors per node)."""

    def __init__(self, message: str, response: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.response = dict(response)


class ExecutionFailed(AssertionError):
    """A queued prompt finished with an execution error (or was interrupted)."""

    def __init__(self, message: str, prompt_id: str, error: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.prompt_id = prompt_id
        self.error = dict(error)
        self.node_id = str(error.get("node_id", ""))
        self.node_type = str(error.get("node_type", ""))
        self.exception_type = str(error.get("exception_type", ""))
        self.exception_message = str(error.get("exception_message", ""))


def _format_rejection(body: Mapping[str, Any]) -> str:
    lines = []
    error = body.get("error")
    if isinstance(error, Mapping):
        lines.append(f"{error.get('type', 'error')}: {error.get('message', '')} {error.get('details', '')}".rstrip())
    elif error:
        lines.append(str(error))
    for node_id, node_error in (body.get("node_errors") or {}).items():
        class_type = node_error.get("class_type", "?")
        for item in node_error.get("errors", []):
            lines.append(
                f"  node {node_id} ({class_type}): {item.get('type', '')}: {item.get('message', '')}"
                f" {item.get('details', '')}".rstrip()
            )
    return "\n".join(lines)


def format_execution_error(error: Mapping[str, Any]) -> str:
    """Node, exception and traceback of an ``execution_error`` status message."""
    traceback_lines = error.get("traceback") or []
    if isinstance(traceback_lines, str):
        traceback_text = traceback_lines
    else:
        traceback_text = "".join(str(line) for line in traceback_lines)
    return (
        f"node {error.get('node_id')} ({error.get('node_type')}) raised "
        f"{error.get('exception_type')}: {error.get('exception_message')}\n{traceback_text}"
    ).rstrip()


class ComfyClient:
    """A small synchronous client of ComfyUI's HTTP API (stdlib only; proxies bypassed)."""

    def __init__(self, base_url: str, dirs: ServerDirs | None = None,
                 log_tail: Callable[[int], str] | None = None, request_timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.dirs = dirs
        self.client_id = uuid.uuid4().hex
        self.request_timeout = request_timeout
        self._log_tail = log_tail
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- raw HTTP ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, payload: Any = None, timeout: float | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with self._opener.open(request, timeout=timeout or self.request_timeout) as response:
            body = response.read()
        if not body:
            return None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body

    def get_json(self, path: str, timeout: float | None = None) -> Any:
        return self._request("GET", path, timeout=timeout)

    def post_json(self, path: str, payload: Any, timeout: float | None = None) -> Any:
        return self._request("POST", path, payload, timeout=timeout)

    def get_bytes(self, path: str, timeout: float | None = None) -> bytes:
        request = urllib.request.Request(self.base_url + path, method="GET")
        with self._opener.open(request, timeout=timeout or self.request_timeout) as response:
            return bytes(response.read())

    def log_tail(self, lines: int = 60) -> str:
        return self._log_tail(lines) if self._log_tail else ""

    # -- API ----------------------------------------------------------------------------------

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """``GET /object_info`` (all node classes, or one)."""
        path = "/object_info" if node_class is None else f"/object_info/{urllib.parse.quote(node_class)}"
        result = self.get_json(path)
        if not isinstance(result, dict):
            raise AssertionError(f"unexpected answer from {path}: {result!r}")
        return result

    def system_stats(self) -> dict[str, Any]:
        return dict(self.get_json("/system_stats"))

    def queue(self) -> dict[str, Any]:
        return dict(self.get_json("/queue"))

    def history(self, prompt_id: str) -> dict[str, Any]:
        """The history entry of one prompt ({} while it has not finished)."""
        result = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
        if not isinstance(result, dict):
            return {}
        return dict(result.get(prompt_id) or {})

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def free_memory(self, unload_models: bool = True) -> None:
        """Ask the worker to unload models and drop its caches (done between prompts)."""
        self.post_json("/free", {"unload_models": unload_models, "free_memory": True})

    def queue_prompt(self, api_graph: Mapping[str, Any], extra_data: Mapping[str, Any] | None = None) -> str:
        """``POST /prompt``; returns the prompt id, raises :class:`PromptRejected` on validation errors."""
        payload: dict[str, Any] = {"prompt": dict(api_graph), "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = dict(extra_data)
        try:
            answer = self.post_json("/prompt", payload)
        except urllib.error.HTTPError as error:
            raw = error.read().decode("utf-8", errors="replace")
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                body = {"error": raw}
            raise PromptRejected(
                f"ComfyUI rejected the prompt (HTTP {error.code}):\n{_format_rejection(body)}", body
            ) from None
        prompt_id = str(answer["prompt_id"])
        if answer.get("node_errors"):
            # Valid outputs run; the invalid ones are dropped (ComfyUI's partial execution).
            log.warning("prompt %s queued with node errors:\n%s", prompt_id, _format_rejection(answer))
        log.info("queued prompt %s (%d nodes)", prompt_id, len(api_graph))
        return prompt_id

    def wait_for(self, prompt_id: str, timeout: float = 600.0, poll_interval: float = 0.25) -> dict[str, Any]:
        """Poll ``/history/<id>`` until the prompt finished; return its ``outputs`` per node id.

        Raises :class:`ExecutionFailed` (an ``AssertionError``) with the failing node, the
        exception and its traceback when execution failed, and ``AssertionError`` on timeout
        (after interrupting the prompt so that later tests do not queue behind it).
        """
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        while True:
            entry = self.history(prompt_id)
            if entry:
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or status.get("completed") is False:
                    raise self._execution_failure(prompt_id, status)
                log.info("prompt %s finished in %.1f s", prompt_id, time.monotonic() - started)
                return dict(entry.get("outputs") or {})
            if time.monotonic() > deadline:
                with contextlib.suppress(OSError):
                    self.interrupt()
                queue = {}
                with contextlib.suppress(OSError):
                    queue = self.queue()
                running = [item[1] for item in queue.get("queue_running", [])]
                pending = [item[1] for item in queue.get("queue_pending", [])]
                raise AssertionError(
                    f"prompt {prompt_id} did not finish within {timeout:.0f} s "
                    f"(running: {running}, pending: {pending}); server log tail:\n{self.log_tail()}"
                )
            time.sleep(poll_interval)

    def _execution_failure(self, prompt_id: str, status: Mapping[str, Any]) -> ExecutionFailed:
        for event, data in status.get("messages") or []:
            if event == "execution_error":
                return ExecutionFailed(
                    f"prompt {prompt_id} failed: {format_execution_error(data)}", prompt_id, data
                )
            if event == "execution_interrupted":
                return ExecutionFailed(
                    f"prompt {prompt_id} was interrupted at node {data.get('node_id')} ({data.get('node_type')})",
                    prompt_id, data,
                )
        return ExecutionFailed(
            f"prompt {prompt_id} failed without an error message (status {dict(status)}); "
            f"server log tail:\n{self.log_tail()}",
            prompt_id, {},
        )

    def run(self, api_graph: Mapping[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        """Queue an API-format graph and wait for its outputs."""
        return self.wait_for(self.queue_prompt(api_graph), timeout=timeout)

    def run_ui_workflow(self, workflow: Mapping[str, Any] | str | os.PathLike[str],
                        overrides: Mapping[str, Mapping[str, Any]] | None = None,
                        timeout: float = 600.0) -> dict[str, Any]:
        """Convert a frontend workflow (dict or .json path), apply ``overrides`` and run it.

        ``overrides`` maps a class type (or a node id) to input values, e.g.
        ``{"CheckpointLoaderSimple": {"ckpt_name": ckpt.name}, "KSampler": {"steps": 2}}``.
        """
        ui = load_workflow(workflow) if not isinstance(workflow, Mapping) else workflow
        api = ui_to_api(ui, self.object_info())
        for target, values in (overrides or {}).items():
            override_inputs(api, target, **values)
        return self.run(api, timeout=timeout)

    # -- files --------------------------------------------------------------------------------

    def output_path(self, item: Mapping[str, Any]) -> Path:
        """Local path of an output entry (``{"filename", "subfolder", "type"}``)."""
        if self.dirs is None:
            raise RuntimeError("this client does not know the server's folders")
        roots = {"output": self.dirs.output, "temp": self.dirs.temp, "input": self.dirs.input}
        root = roots[str(item.get("type", "output"))]
        return root / str(item.get("subfolder") or "") / str(item["filename"])

    def view(self, item: Mapping[str, Any]) -> bytes:
        """Fetch an output entry through ``GET /view`` (what the frontend does)."""
        query = urllib.parse.urlencode({
            "filename": item["filename"], "subfolder": item.get("subfolder") or "", "type": item.get("type", "output"),
        })
        return self.get_bytes(f"/view?{query}")

    def output_files(self, outputs: Mapping[str, Any], kind: str = "images") -> list[Path]:
        """Local paths of every ``kind`` entry (images, gifs, ...) in ``wait_for``'s outputs."""
        paths = []
        for node_outputs in outputs.values():
            for item in node_outputs.get(kind, []) or []:
                paths.append(self.output_path(item))
        return paths

    def put_input(self, name: str, data: bytes) -> str:
        """Write a file into the server's input folder; returns the name nodes refer to it by."""
        if self.dirs is None:
            raise RuntimeError("this client does not know the server's folders")
        target = self.dirs.input / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return name


# --------------------------------------------------------------------------------------------
# Server process
# --------------------------------------------------------------------------------------------


class ServerStartError(RuntimeError):
    pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: have the kernel send SIGTERM to the server should the test process die."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class ComfyServer:
    """One ComfyUI server process (``main.py --cpu``) on a free loopback port."""

    def __init__(self, comfy_root: Path, dirs: ServerDirs, python: str = sys.executable,
                 extra_args: Sequence[str] = (), log_level: str = "INFO") -> None:
        self.comfy_root = comfy_root
        self.dirs = dirs
        self.python = python
        self.extra_args = list(extra_args)
        self.log_level = log_level
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log_handle: BinaryIO | None = None
        self._client: ComfyClient | None = None
        self.startup_seconds = 0.0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dirs.log_file

    @property
    def client(self) -> ComfyClient:
        """The client of the running server (one per port)."""
        if self._client is None or self._client.base_url != self.url:
            self._client = ComfyClient(self.url, dirs=self.dirs, log_tail=self.log_tail)
        return self._client

    def command(self, port: int) -> list[str]:
        flags = supported_cli_flags(self.comfy_root)
        if "--base-directory" not in flags:
            raise ServerStartError(f"ComfyUI at {self.comfy_root} is too old: no --base-directory")
        cmd = [
            self.python, str(self.comfy_root / "main.py"),
            "--cpu", "--listen", LOOPBACK, "--port", str(port),
            "--base-directory", str(self.dirs.base),
        ]
        optional: list[tuple[str, list[str]]] = [
            ("--disable-auto-launch", []),
            # Paid API nodes are useless offline and slow the start down.
            ("--disable-api-nodes", []),
            # The default database lives in the ComfyUI checkout: keep it in the temp tree.
            ("--database-url", [f"sqlite:///{self.dirs.user / 'comfyui.db'}"]),
            ("--verbose", [self.log_level]),
        ]
        for flag, values in optional:
            if flag in flags:
                cmd += [flag, *values]
        return cmd + self.extra_args

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 180.0, attempts: int = 3) -> ComfyClient:
        """Start the server and wait until ``GET /object_info`` answers; return a client."""
        last_error: Exception | None = None
        for _ in range(attempts):
            self.port = free_port()
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self.client
            except ServerStartError as error:
                last_error = error
                self.stop()
                if "address already in use" not in self.log_text().lower():
                    break
                log.warning("port %d was taken meanwhile; retrying on another one", self.port)
        assert last_error is not None
        raise last_error

    def _spawn(self) -> None:
        env = dict(os.environ)
        env.update({
            "PYTHONUNBUFFERED": "1",
            # Nothing gets written into the ComfyUI checkout or the pack (no __pycache__ there).
            "PYTHONDONTWRITEBYTECODE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DO_NOT_TRACK": "1",
        })
        cmd = self.command(self.port)
        self._log_handle = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_handle.write(f"\n=== {' '.join(shlex.quote(c) for c in cmd)}\n".encode())
        self._log_handle.flush()
        log.info("starting ComfyUI: %s", " ".join(cmd))
        self.process = subprocess.Popen(
            cmd,
            cwd=self.dirs.base,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def _wait_ready(self, timeout: float) -> None:
        started = time.monotonic()
        client = ComfyClient(self.url, request_timeout=30.0)
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"ComfyUI exited with code {code} while starting; log {self.log_path}:\n{self.log_tail(80)}"
                )
            try:
                info = client.object_info()
            except (OSError, http.client.HTTPException, ValueError, AssertionError):
                info = None  # not listening yet, or routes not added yet
            if info:
                self.startup_seconds = time.monotonic() - started
                log.info("ComfyUI answered /object_info after %.1f s (%d node classes)",
                         self.startup_seconds, len(info))
                return
            if time.monotonic() - started > timeout:
                raise ServerStartError(
                    f"ComfyUI did not answer /object_info within {timeout:.0f} s; log {self.log_path}:\n"
                    f"{self.log_tail(80)}"
                )
            time.sleep(0.5)

    def stop(self, grace: float = 15.0) -> None:
        """Terminate the server's process group; kill it if it does not go within ``grace`` s."""
        process = self.process
        if process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("ComfyUI did not stop within %.0f s; killing it", grace)
            # Whatever happened, nothing of the group survives.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace)
            self.process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def pack_node_classes(self, object_info: Mapping[str, Any] | None = None) -> list[str]:
        """Node classes the pack registered (``python_module == custom_nodes.comfyui-idfuse``)."""
        info = self.client.object_info() if object_info is None else object_info
        return sorted(name for name, spec in info.items()
                      if str(spec.get("python_module", "")).startswith(PACK_PYTHON_MODULE))

    def __enter__(self) -> ComfyServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# UI workflow -> API prompt
# --------------------------------------------------------------------------------------------

# Frontend-only nodes: never sent to the server.
UI_ONLY_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
MODE_MUTED = 2  # LGraphEventMode.NEVER
MODE_BYPASS = 4  # LGraphEventMode.BYPASS
# Input types the frontend (1.2x) turns into widgets (ComfyWidgets); custom widget types
# registered by a pack's JavaScript can be added by the caller through ``widget_types``.
WIDGET_TYPES = frozenset({
    "INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "IMAGEUPLOAD", "FILEUPLOAD", "COLOR",
    "IMAGECOMPARE", "TREESELECT", "MULTISELECT", "CHART", "GALLERIA", "SELECTBUTTON", "TEXTAREA",
})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})
_SEED_NAMES = ("seed", "noise_seed")


@dataclass(frozen=True)
class _Link:
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: str


@dataclass(frozen=True)
class _Literal:
    value: Any


def load_workflow(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return dict(json.load(handle))


def _spec_parts(spec: Any) -> tuple[Any, dict[str, Any]]:
    if isinstance(spec, (list, tuple)) and spec:
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        return spec[0], options
    return spec, {}


def _is_combo(type_: Any) -> bool:
    return isinstance(type_, (list, tuple)) or type_ == "COMBO"


def _is_widget(spec: Any, optional: bool, widget_types: frozenset[str]) -> bool:
    type_, options = _spec_parts(spec)
    if options.get("forceInput") or (optional and options.get("defaultInput")):
        return False
    if _is_combo(type_):
        return True
    return str(options.get("widgetType") or type_) in widget_types


def _control_widgets(name: str, spec: Any) -> int:
    """How many frontend-only widgets follow this input's widget (control_after_generate & co)."""
    type_, options = _spec_parts(spec)
    if type_ == "INT":
        control = options.get("control_after_generate")
        if control is None:
            control = name in _SEED_NAMES
        return 1 if control else 0
    if _is_combo(type_) and options.get("control_after_generate"):
        return 2  # the control combo and its "control_filter_list" string
    return 0


def _ordered_inputs(node_info: Mapping[str, Any]) -> list[tuple[str, Any, bool]]:
    """(name, spec, optional) in the frontend's order: input_order required, optional, the rest."""
    inputs = node_info.get("input") or {}
    order = node_info.get("input_order") or {}
    result: list[tuple[str, Any, bool]] = []
    seen: set[str] = set()
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = list(order.get(section) or specs.keys())
        for name in names:
            if name in specs and name not in seen:
                result.append((name, specs[name], section == "optional"))
                seen.add(name)
    for section in ("required", "optional"):
        for name, spec in (inputs.get(section) or {}).items():
            if name not in seen:
                result.append((name, spec, section == "optional"))
                seen.add(name)
    return result


def _widget_values(node: Mapping[str, Any], node_info: Mapping[str, Any],
                   widget_types: frozenset[str]) -> dict[str, Any]:
    values = node.get("widgets_values")
    if values is None:
        return {}
    ordered = _ordered_inputs(node_info)
    if isinstance(values, Mapping):  # some packs save widgets by name
        return {name: values[name] for name, spec, optional in ordered
                if name in values and _is_widget(spec, optional, widget_types)}
    widgets = [(name, spec, True) for name, spec, optional in ordered if _is_widget(spec, optional, widget_types)]
    # Old workflows kept a value for forceInput inputs too (the frontend's migrateWidgetsValues).
    legacy = [(name, spec, _is_widget(spec, optional, widget_types)) for name, spec, optional in ordered
              if _is_widget(spec, optional, widget_types) or _spec_parts(spec)[1].get("forceInput")]
    if len(legacy) != len(widgets):
        legacy_count = sum(2 if (_spec_parts(spec)[1].get("control_after_generate") or name in _SEED_NAMES) else 1
                           for name, spec, _ in legacy)
        if legacy_count == len(values):
            widgets = legacy
    result: dict[str, Any] = {}
    index = 0
    for name, spec, is_widget in widgets:
        if index >= len(values):
            break
        value = values[index]
        index += 1
        if is_widget and value is not None:  # None: a hole left by a non-serialised widget
            result[name] = value
        extra = _control_widgets(name, spec)
        if extra and index < len(values):
            control = values[index]
            # Tolerate hand-written workflows that leave the control value out.
            if control is None or isinstance(control, bool) or (isinstance(control, str) and control in CONTROL_VALUES):
                index += extra
    return result


def _parse_links(raw_links: Iterable[Any]) -> dict[int, _Link]:
    links: dict[int, _Link] = {}
    for raw in raw_links or []:
        if isinstance(raw, Mapping):  # workflow schema 1 stores links as objects
            link_id, origin, origin_slot = raw["id"], raw["origin_id"], raw["origin_slot"]
            target, target_slot, type_ = raw["target_id"], raw["target_slot"], raw.get("type", "*")
        else:
            link_id, origin, origin_slot, target, target_slot, type_ = raw[:6]
        links[int(link_id)] = _Link(str(origin), int(origin_slot), str(target), int(target_slot), str(type_))
    return links


def _types_match(a: Any, b: Any) -> bool:
    a, b = str(a or "*"), str(b or "*")
    if a == b or "*" in (a, b):
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


def _bypass_input(node: Mapping[str, Any], slot: int, link_type: str) -> Mapping[str, Any] | None:
    """The input a bypassed node passes through to output ``slot`` (the frontend's rule)."""
    inputs = list(node.get("inputs") or [])
    outputs = list(node.get("outputs") or [])
    out_type = outputs[slot].get("type", link_type) if slot < len(outputs) else link_type
    if not inputs:
        return None
    if str(out_type) == "*":
        return inputs[slot] if slot < len(inputs) else inputs[0]
    if slot < len(inputs) and _types_match(inputs[slot].get("type"), out_type):
        return inputs[slot]
    for candidate in inputs:
        if str(candidate.get("type")) == str(out_type):
            return candidate
    for candidate in inputs:
        if _types_match(candidate.get("type"), out_type):
            return candidate
    return None


def _resolve(link_id: int | None, nodes: Mapping[str, Mapping[str, Any]], links: Mapping[int, _Link],
             depth: int = 0) -> list[Any] | _Literal | None:
    """Follow a link back through reroutes, primitives and bypassed nodes to a real output."""
    if link_id is None or depth > 256:
        return None
    link = links.get(int(link_id))
    if link is None:
        return None
    origin = nodes.get(link.origin_id)
    if origin is None:
        return None
    type_ = origin.get("type")
    if type_ == "Reroute":
        first = (origin.get("inputs") or [{}])[0]
        return _resolve(first.get("link"), nodes, links, depth + 1)
    if type_ == "PrimitiveNode":
        values = origin.get("widgets_values") or []
        return _Literal(values[0]) if values else None
    mode = origin.get("mode", 0)
    if mode == MODE_MUTED or type_ in UI_ONLY_NODE_TYPES:
        return None
    if mode == MODE_BYPASS:
        passed = _bypass_input(origin, link.origin_slot, link.type)
        return None if passed is None else _resolve(passed.get("link"), nodes, links, depth + 1)
    return [str(origin["id"]), link.origin_slot]


def ui_to_api(ui_workflow: Mapping[str, Any], object_info: Mapping[str, Any],
              widget_types: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Convert a frontend workflow (``nodes`` + ``links``) to an API prompt ``{id: {class_type, inputs}}``.

    Widget values are mapped by position onto the node's widget inputs in ``object_info``'s
    order (required, then optional), skipping the frontend-only ``control_after_generate``
    value after seed-like INT widgets (and the control + filter values after combos that ask
    for one). Linked inputs, including widgets converted to inputs, take their link: through
    ``Reroute`` nodes, from ``PrimitiveNode`` values, and through bypassed nodes (mode 4) as
    the frontend does. Notes, reroutes, primitives, muted (mode 2) and bypassed nodes are left out.
    """
    types = WIDGET_TYPES | frozenset(widget_types)
    subgraphs = {str(sub.get("id")) for sub in ((ui_workflow.get("definitions") or {}).get("subgraphs") or [])}
    nodes = {str(node["id"]): node for node in ui_workflow.get("nodes") or []}
    links = _parse_links(ui_workflow.get("links") or [])
    api: dict[str, dict[str, Any]] = {}
    for node_id, node in nodes.items():
        class_type = str(node.get("type"))
        if class_type in UI_ONLY_NODE_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        if class_type in subgraphs:
            raise NotImplementedError(f"node {node_id} is a subgraph ({class_type}); unpack it in the frontend first")
        if class_type not in object_info:
            raise KeyError(f"node {node_id}: unknown node type {class_type!r} (a pack not loaded, "
                           f"or a frontend-only node)")
        node_info = object_info[class_type]
        inputs = _widget_values(node, node_info, types)
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            name = str((slot.get("widget") or {}).get("name") or slot["name"])
            source = _resolve(slot["link"], nodes, links)
            if source is None:
                continue  # from a muted node: the widget value (if any) stays
            inputs[name] = source.value if isinstance(source, _Literal) else source
        title = node.get("title") or node_info.get("display_name") or class_type
        api[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
    return api


def override_inputs(api_graph: dict[str, dict[str, Any]], target: str, /, **values: Any) -> list[str]:
    """Set input values on every node of class ``target`` (or on the node with id ``target``).

    Returns the ids changed; raises ``KeyError`` when nothing matches so that a renamed node
    does not silently leave a real model name or a 20-step sampler in a test.
    """
    if target in api_graph:
        ids = [target]
    else:
        ids = [node_id for node_id, node in api_graph.items() if node["class_type"] == target]
    if not ids:
        raise KeyError(f"no node of class or id {target!r} in the graph")
    for node_id in ids:
        api_graph[node_id]["inputs"].update(values)
    return ids


def strip_meta(api_graph: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The graph without ``_meta`` (for comparisons)."""
    return {node_id: {key: value for key, value in node.items() if key != "_meta"}
            for node_id, node in api_graph.items()}
