"""scripts/host.py: the pack without ComfyUI, finding ComfyUI, telling it it runs on a CPU; and the launcher
that runs a script against the tests' ComfyUI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = PACK_ROOT / "scripts"
LAUNCHER = PACK_ROOT / "tests" / "support" / "script_launcher.py"
sys.path.insert(0, str(SCRIPTS))

import host  # noqa: E402


def run_python(code: str, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=environ, cwd=cwd or PACK_ROOT, timeout=300)


def last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def fake_comfy(root: Path) -> Path:
    (root / "comfy").mkdir(parents=True)
    (root / "comfy" / "model_patcher.py").write_text("")
    return root


def test_pack_imports_models_without_comfyui():
    result = run_python(f"""
        import json, sys
        sys.path.insert(0, {str(SCRIPTS)!r})
        import host
        package = host.pack()
        from comfyui_idfuse.models.faces import BACKENDS
        from comfyui_idfuse.models import errors
        print(json.dumps({{"name": package.__name__, "backends": [k.__name__ for k in BACKENDS],
                          "comfy": any(m == "comfy" or m.startswith("comfy.") for m in sys.modules),
                          "nodes": "comfyui_idfuse.nodes" in sys.modules, "same": host.pack() is package,
                          "errors": errors.__name__}}))
    """)
    out = last_json(result)
    assert out["name"] == "comfyui_idfuse" and out["same"]
    assert "DlibBackend" in out["backends"]
    assert out["errors"] == "comfyui_idfuse.models.errors"
    assert not out["comfy"] and not out["nodes"]


def test_pack_returns_an_already_imported_pack(pack):
    assert host.pack() is pack


def test_find_comfy_order(tmp_path, comfy_install):
    flagged, configured = fake_comfy(tmp_path / "flag"), fake_comfy(tmp_path / "env")
    ancestor = fake_comfy(tmp_path / "ComfyUI")
    pack_dir = ancestor / "custom_nodes" / "ComfyUI-IDFuse"
    pack_dir.mkdir(parents=True)
    env = {"COMFYUI_PATH": str(configured)}
    assert host.find_comfy(str(flagged), env, pack_dir) == flagged.resolve()
    assert host.find_comfy(None, env, pack_dir) == configured.resolve()
    assert host.find_comfy(None, {}, pack_dir) == ancestor.resolve()
    # Otherwise the comfy package already importable (here: the tests' ComfyUI).
    assert host.find_comfy(None, {}, tmp_path / "elsewhere").resolve() == Path(comfy_install.root).resolve()


def test_find_comfy_symlinked_into_custom_nodes(tmp_path):
    ancestor = fake_comfy(tmp_path / "ComfyUI")
    (ancestor / "custom_nodes").mkdir()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (ancestor / "custom_nodes" / "pack").symlink_to(checkout, target_is_directory=True)
    assert host.find_comfy(None, {}, ancestor / "custom_nodes" / "pack") == ancestor.resolve()


def test_find_comfy_errors_name_the_flag_and_variable(tmp_path, monkeypatch):
    errors = host.pack().models.errors
    with pytest.raises(errors.IDFuseInputError, match="--comfyui="):
        host.find_comfy(str(tmp_path), {}, tmp_path)
    with pytest.raises(errors.IDFuseInputError, match="COMFYUI_PATH="):
        host.find_comfy(None, {"COMFYUI_PATH": str(tmp_path)}, tmp_path)
    monkeypatch.setattr(host.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(errors.IDFuseInputError, match="--comfyui.*COMFYUI_PATH"):
        host.find_comfy(None, {}, tmp_path)


@pytest.mark.parametrize("cpu, expected", [(True, True), (False, False), (None, True)])
def test_comfy_tells_comfyui_about_the_cpu(comfy_install, cpu, expected):
    """In a fresh process, as a script would: ComfyUI parses --cpu (or not) before model_management; the script's
    own arguments stay in sys.argv and never reach ComfyUI's parser. (CI has no CUDA: None means the CPU.)"""
    result = run_python(f"""
        import json, sys
        sys.path.insert(0, {str(SCRIPTS)!r})
        import host
        root = host.comfy({str(comfy_install.root)!r}, cpu={cpu!r})
        import comfy.cli_args
        print(json.dumps({{"root": str(root), "cpu": comfy.cli_args.args.cpu, "argv": sys.argv[1:],
                          "first": sys.path[0]}}))
    """, "--script-flag", "7")
    out = last_json(result)
    assert out["cpu"] is expected
    assert out["argv"] == ["--script-flag", "7"]
    assert Path(out["root"]) == Path(comfy_install.root).resolve() == Path(out["first"])


def test_comfy_from_the_environment_variable(comfy_install):
    result = run_python(f"""
        import json, sys
        sys.path.insert(0, {str(SCRIPTS)!r})
        import host
        root = host.comfy()
        import comfy.model_management as mm
        print(json.dumps({{"root": str(root), "device": str(mm.get_torch_device())}}))
    """, env={"COMFYUI_PATH": str(comfy_install.root), "CUDA_VISIBLE_DEVICES": ""})
    out = last_json(result)
    assert Path(out["root"]) == Path(comfy_install.root).resolve()
    assert out["device"] == "cpu"


def test_launcher_runs_a_script_with_the_pack_nodes_and_its_arguments(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        first = sys.path[0]
        sys.path.insert(0, {str(SCRIPTS)!r})
        import host
        host.comfy()
        from comfyui_idfuse.nodes.glue.clip_vision import clip_vision_penultimate
        import comfy.cli_args
        print(json.dumps({{"name": __name__, "argv": sys.argv, "cpu": comfy.cli_args.args.cpu,
                          "script_dir_first": first == {str(tmp_path)!r},
                          "glue": clip_vision_penultimate.__module__}}))
    """))
    result = subprocess.run([sys.executable, str(LAUNCHER), str(script), "--a", "b"], capture_output=True,
                            text=True, cwd=PACK_ROOT, timeout=300)
    out = last_json(result)
    assert out["name"] == "__main__"
    assert out["argv"] == [str(script), "--a", "b"]
    assert out["cpu"] is True and out["script_dir_first"]
    assert out["glue"] == "comfyui_idfuse.nodes.glue.clip_vision"
