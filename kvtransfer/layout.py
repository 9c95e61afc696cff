"""The KV layout fingerprint: two workers may exchange KV blocks only when theirs are equal.

It covers everything that decides what the bytes of a block mean: the model (and so the hash
seed), the element type, and the block's shape [layers, 2, kv heads, block size, head dim].
Plain Python (no torch), so the gateway can compare fingerprints from registrations.
"""

from __future__ import annotations

import hashlib


def layout_fingerprint(model_id: str, dtype: str, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int) -> str:
    """A 16-hex-digit digest of the layout; stable across processes, versions and machines."""
    text = f"tandem-kv-layout-v1|{model_id}|{dtype}|{num_layers}|{num_kv_heads}|{head_dim}|{block_size}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
