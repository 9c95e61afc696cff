"""Rebuild a Hugging Face ``tokenizer.json`` from the tokenizer metadata of a GGUF file.

A GGUF carries no ``tokenizer.json``; llama.cpp stores the vocabulary, the merges, each token's type
and the special token ids as metadata instead. For a byte-level BPE vocabulary
(``tokenizer.ggml.model == "gpt2"``) that is everything a ``tokenizers.Tokenizer`` needs, except the
pre-tokenizer, which llama.cpp names only by key (``tokenizer.ggml.pre``) and implements in C++.
This module maps that key back to the equivalent ``tokenizers`` pipeline.

Only what the embedded default model (SmolLM2, ``pre == "smollm"``) and plain GPT-2 style files
need is supported; anything else fails loudly rather than producing a tokenizer that silently
splits text differently from the one the model was trained with.
"""

from __future__ import annotations

from typing import Any

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

_MISSING = object()

# llama.cpp's `llama_token_type`: CONTROL tokens (<|im_start|>, <|endoftext|>, ...) must be matched
# whole in raw text and are hidden by `skip_special_tokens`.
TOKEN_TYPE_CONTROL = 3
# USER_DEFINED tokens are also matched whole by llama.cpp, but are ordinary (non-special) text.
TOKEN_TYPE_USER_DEFINED = 4


def gguf_value(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """The Python value of metadata field ``key`` (lists for arrays), or ``default`` if absent.

    Shared by the model converter, so both read metadata the same way and report a missing
    required key with the file's own key name.
    """
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise KeyError(f"GGUF metadata key {key!r} is missing; cannot convert this file")
        return default
    return field.contents()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in.

    Written out rather than imported from transformers so the converter depends only on
    ``tokenizers``; it is the same table ``tokenizers.pre_tokenizers.ByteLevel`` uses internally.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shift)
            shift += 1
    return table


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The ``tokenizers`` equivalent of llama.cpp's pre-tokenizer named ``pre``.

    llama.cpp's "smollm" first isolates every ``\\p{N}`` character, then applies the GPT-2 regex to
    each remaining fragment. ``Digits(individual_digits=True)`` followed by ``ByteLevel(use_regex)``
    is exactly that (and is what SmolLM2's original tokenizer.json uses). Note that transformers'
    own GGUF loader (5.x) does not know "smollm" and falls back to the bare GPT-2 regex; the two
    differ on a run of whitespace directly before a digit ("a  1": ["a", "ĠĠ", "1"] here and in
    llama.cpp, ["a", "Ġ", "Ġ", "1"] there). We follow llama.cpp and the original tokenizer.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported by this converter (supported: smollm, gpt2, default)")


def build_tokenizer(reader: GGUFReader) -> Tokenizer:
    """Build the byte-level BPE ``Tokenizer`` that the GGUF's tokenizer metadata describes."""
    kind = gguf_value(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') is")
    tokens: list[str] = gguf_value(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = gguf_value(reader, "tokenizer.ggml.token_type", [])
    raw_merges: list[str] = gguf_value(reader, "tokenizer.ggml.merges")
    pre = gguf_value(reader, "tokenizer.ggml.pre", "default")

    # Byte-level vocabularies are normally already spelled in the byte alphabet; a token that is
    # not (a llama.cpp quirk for some control tokens) is respelled from its UTF-8 bytes, exactly as
    # transformers' GGUF loader does, so both produce the same vocabulary.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        spelled = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(spelled, index)
    if len(vocab) != len(tokens):
        raise ValueError(f"GGUF vocabulary has duplicate tokens ({len(tokens) - len(vocab)} collisions)")

    merges: list[tuple[str, str]] = []
    for merge in raw_merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"malformed GGUF merge {merge!r}: expected two tokens separated by one space")
        merges.append((parts[0], parts[1]))

    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,  # byte-level: every byte has a token, so nothing is ever unknown
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    # ByteLevel post-processing only fixes offsets; it adds no tokens (the model wants no BOS).
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    # Register in id order so `added_tokens` in tokenizer.json lists them like the vocabulary does.
    # A control token spelled outside the byte alphabet cannot be a real entry of a byte-level
    # vocabulary, so adding it would allocate a new id past the model's vocab; skip it like
    # transformers does.
    special: list[AddedToken] = []
    user_defined: list[AddedToken] = []
    for token, token_type in zip(tokens, token_types):
        if token_type == TOKEN_TYPE_CONTROL and set(token) <= alphabet:
            special.append(AddedToken(token, normalized=False, special=True))
        elif token_type == TOKEN_TYPE_USER_DEFINED and token in vocab:
            user_defined.append(AddedToken(token, normalized=False, special=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError("registering special tokens grew the vocabulary; the GGUF token table is inconsistent")
    return tokenizer


def special_token_ids(reader: GGUFReader) -> dict[str, int | None]:
    """``{"bos": id, "eos": id, "unk": id, "pad": id}`` from the GGUF, ``None`` where not set."""
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    return {name: gguf_value(reader, f"tokenizer.ggml.{key}", None) for name, key in keys.items()}


def tokenizer_config(reader: GGUFReader, model_max_length: int) -> dict[str, Any]:
    """The ``tokenizer_config.json`` that makes ``AutoTokenizer`` load ``tokenizer.json`` as-is."""
    tokens: list[str] = gguf_value(reader, "tokenizer.ggml.tokens")
    ids = special_token_ids(reader)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # llama.cpp's default for a BPE vocabulary is no BOS; the chat template writes its own.
        "add_bos_token": bool(gguf_value(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(gguf_value(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    for name, token_id in ids.items():
        if token_id is not None:
            config[f"{name}_token"] = tokens[token_id]
    template = gguf_value(reader, "tokenizer.chat_template", None)
    if template is not None:
        config["chat_template"] = template
    return config
