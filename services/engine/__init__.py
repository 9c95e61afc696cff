"""The model runtime: a paged-KV, continuous-batching engine (see DESIGN §5).

Imported lazily so that importing one light module of this package (sampling_params.py, say)
does not pull in torch. The tokenizer and model-directory code the tokenizer service needs lives
in services/model_files/, below the engine, so that service never imports the engine at all.
"""

from __future__ import annotations

_EXPORTS = {
    "LLM": ".llm",
    "SamplingParams": ".sampling_params",
    "AsyncEngine": ".async_engine",
    "EngineConfig": ".engine_config",
    "EngineCore": ".engine_core",
    "RequestOutput": ".engine_core",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
