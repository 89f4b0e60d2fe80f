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
def one_torch_thread():
    """These models are tiny: one thread runs them as fast, and on a busy machine several threads fight over
    the cores (measured: 0.4 s against 18 s a step on 2 shared cores). Restored after each test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
