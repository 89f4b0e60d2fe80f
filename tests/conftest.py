from __future__ import annotations

import comfy_env
import pytest

COMFY = comfy_env.setup_comfy()


def pytest_report_header(config):
    return f"ComfyUI: {COMFY.kind} at {COMFY.root}"


@pytest.fixture(scope="session")
def comfy_install():
    return COMFY


@pytest.fixture(scope="session")
def tokenizer_dir():
    return comfy_env.clip_tokenizer_dir(COMFY)


@pytest.fixture(scope="session")
def pack():
    return comfy_env.import_pack()
