"""Fixtures of the encoder-training tests: small SD1.5/SDXL UNets built with ComfyUI's own classes."""

from __future__ import annotations

import functools

import pytest
from factories import make_model


@pytest.fixture(scope="session")
def unet():
    """``unet(family, prediction="eps")``: one model per kind, built on first use and shared (the tests never
    change a model: one of them proves it)."""
    return functools.cache(lambda family, prediction="eps": make_model(family, prediction=prediction))


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (tests/conftest.py one_torch_thread)."""
    yield
