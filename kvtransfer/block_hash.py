"""Chained block hashes over full blocks of token ids — the one definition every process shares.

A prompt is cut into blocks of `block_size` tokens. Only *full* blocks are hashed; the trailing
partial block has no identity because its KV is still growing. Each hash covers its parent, so
equal hashes mean equal prefixes, not just equal blocks:

    root = H(b"tandem-block-root", model_id, cache_salt)
    h_0  = H(root,    tokens[0:bs])
    h_i  = H(h_{i-1}, tokens[i*bs:(i+1)*bs])

H is BLAKE2b with an 8-byte digest, so hashes are 64-bit, deterministic across processes, machines
and restarts (never Python's `hash()`, which is salted per process). Token ids are packed as
little-endian uint32. This module imports no torch: the gateway imports it too, and a test proves
the gateway's hashes equal the engine's.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

_ROOT_DOMAIN = b"tandem-block-root/v1"
_U64 = struct.Struct("<Q")


def _h(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def root_hash(model_id: str, cache_salt: str | None = None) -> int:
    """The parent of a sequence's first block: different models (or salts) never share blocks."""
    salt = (cache_salt or "").encode()
    model = model_id.encode()
    return _h(_ROOT_DOMAIN + _U64.pack(len(model)) + model + _U64.pack(len(salt)) + salt)


def hash_block(parent_hash: int, token_ids: Sequence[int] | np.ndarray) -> int:
    """Hash of one full block given its parent's hash."""
    packed = np.asarray(token_ids, dtype="<u4").tobytes()
    return _h(_U64.pack(parent_hash) + packed)


def hash_blocks(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int,
    model_id: str,
    cache_salt: str | None = None,
    *,
    parent_hash: int | None = None,
    num_blocks: int | None = None,
) -> list[int]:
    """Chained hashes of every full block of `token_ids` (at most `num_blocks` of them).

    `parent_hash` continues an existing chain (the caller already hashed the earlier blocks and
    passes `token_ids` starting at the next block boundary); otherwise the chain starts at the root.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    tokens = np.asarray(token_ids, dtype="<u4")
    n_full = len(tokens) // block_size
    if num_blocks is not None:
        n_full = min(n_full, num_blocks)
    parent = root_hash(model_id, cache_salt) if parent_hash is None else parent_hash
    hashes: list[int] = []
    for i in range(n_full):
        parent = _h(_U64.pack(parent) + tokens[i * block_size : (i + 1) * block_size].tobytes())
        hashes.append(parent)
    return hashes
