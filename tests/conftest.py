"""Shared fixtures: a closed-form bilevel quadratic and tiny causal LMs built from config (no downloads)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import Quadratic


@pytest.fixture
def quadratic():
    return Quadratic()


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy machine OpenMP waits make a step take ~1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub(monkeypatch):
    """A stand-in Hub on 127.0.0.1 that accepts the token "hf_fake"; the client is pointed at it."""
    from tests.helpers.fake_hub import FakeHub

    with FakeHub(token="hf_fake") as fake:
        fake.patch_endpoint(monkeypatch)
        yield fake
