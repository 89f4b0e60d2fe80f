"""A small synchronous client of ComfyUI's HTTP API, failing with the node, exception and traceback."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .dirs import ServerDirs
from .workflow import load_workflow, override_inputs, ui_to_api

log = logging.getLogger(__name__)


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

    def output_pixels(self, outputs: Mapping[str, Any]) -> Any:
        """The one image in ``wait_for``'s outputs as an (H, W, C) uint8 array."""
        import numpy as np
        from PIL import Image

        (path,) = self.output_files(outputs)
        return np.asarray(Image.open(path))

    def put_input(self, name: str, data: bytes) -> str:
        """Write a file into the server's input folder; returns the name nodes refer to it by."""
        if self.dirs is None:
            raise RuntimeError("this client does not know the server's folders")
        target = self.dirs.input / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return name
