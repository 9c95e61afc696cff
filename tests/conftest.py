"""Shared fixtures: tiny random models built once per session, uvloop for async tests."""

from __future__ import annotations

import pytest
import uvloop

from tests.helpers.tiny_models import build_tiny_model


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """{'llama': dir, 'qwen2': dir, 'qwen3': dir} of tiny random checkpoints saved in HF format."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dirs):
    return tiny_model_dirs["llama"]
