"""The model runtime: a paged-KV, continuous-batching engine (see DESIGN §5).

Imported lazily so that light modules of this package (tokenizer.py, used by the tokenizer
service) do not pull in torch.
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
