"""One ComfyUI server process: ``main.py --cpu`` with this interpreter on a free loopback port."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .client import ComfyClient
from .dirs import PACK_LINK_NAME, ServerDirs

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
PACK_PYTHON_MODULE = f"custom_nodes.{PACK_LINK_NAME}"


def supported_cli_flags(comfy_root: Path) -> set[str]:
    """The ``--flags`` that this ComfyUI's ``comfy/cli_args.py`` declares."""
    text = (comfy_root / "comfy" / "cli_args.py").read_text(encoding="utf-8")
    return set(re.findall(r"""add_argument\(\s*["'](--[A-Za-z0-9_-]+)["']""", text))


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


def import_failures(log_text: str) -> list[str]:
    """Custom-node modules ComfyUI reported as failing to import."""
    failed = re.findall(r"\(IMPORT FAILED\):\s*(\S.*)$", log_text, flags=re.MULTILINE)
    failed += re.findall(r"Cannot import (\S+) module for custom nodes", log_text)
    return [item.strip() for item in failed]


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
