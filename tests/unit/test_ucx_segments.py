"""How a pull is cut into messages over block-major caches (kvtransfer/ucx_segments.py)."""

from __future__ import annotations

import re
import struct

import pytest
import torch

from kvtransfer.ucx_segments import block_bytes_view, layout_of, segment_buffer, segments


def test_segments_follow_runs_consecutive_on_both_sides():
    src = [3, 4, 5, 6, 40, 41, 9, 63, 0]
    dst = [10, 11, 12, 13, 14, 2, 3, 60, 61]
    assert segments(src, dst, max_blocks=64) == [(3, 10, 4), (40, 14, 1), (41, 2, 1), (9, 3, 1), (63, 60, 1), (0, 61, 1)]


def test_segments_are_cut_at_the_limit():
    assert segments(list(range(10, 17)), list(range(0, 7)), max_blocks=3) == [(10, 0, 3), (13, 3, 3), (16, 6, 1)]
    assert segments([], [], max_blocks=3) == []


def test_a_segment_is_its_blocks_bytes_in_the_cache():
    storage = torch.randn(9, 2, 2, 3, 4, 8)  # [blocks, layers, 2, kv heads, block size, head dim]
    blocks = block_bytes_view(storage)
    assert blocks.shape == (9, 2 * 2 * 3 * 4 * 8 * 4)
    buf = segment_buffer(blocks, 2, 3)
    assert buf.base is not None and bytes(buf) == storage[2:5].numpy().tobytes()
    buf[:] = 0  # a view: a receive into it writes the cache
    assert not storage[2:5].any() and storage[5].any()


def test_layout_of_refuses_a_layer_major_cache():
    with pytest.raises(ValueError, match=r"\[num_blocks, L, 2, kv_heads"):
        layout_of(torch.zeros(2, 2, 3, 9, 4, 8))  # [layers, 2, kv heads, blocks, ...]
    lay = layout_of(torch.zeros(9, 2, 2, 3, 4, 8, dtype=torch.bfloat16))
    assert (lay.num_layers, lay.num_kv_heads, lay.block_size, lay.head_dim, lay.block_bytes) == (2, 3, 4, 8, 2 * 2 * 3 * 4 * 8 * 2)


@pytest.mark.parametrize(
    ("segs", "why"),
    [
        ([], "bad number of segments: 0"),
        ([(0, 0)], r"segment lengths must be 1..2 blocks, got 0..0"),
        ([(0, 1), (4, 3)], r"segment lengths must be 1..2 blocks, got 1..3"),
        ([(8, 2)], "segments reach past the cache's 9 blocks"),
        ([(2**32 - 1, 1)], "segments reach past the cache's 9 blocks"),
    ],
)
def test_the_server_names_what_is_wrong_with_a_request_s_segments(segs, why):
    import numpy as np

    from kvtransfer.ucx_server import KVTransportServer

    storage = torch.zeros(9, 2, 2, 3, 4, 8)  # 1,536-byte blocks
    server = KVTransportServer(storage, segment_bytes=2 * 1536)
    assert re.fullmatch(why, server._bad_segments(np.asarray(segs, dtype=np.int64).reshape(-1, 2)))
    assert server._bad_segments(np.asarray([(0, 2), (8, 1)], dtype=np.int64)) == ""


@pytest.mark.parametrize("cut", [0, 3, 20, -1])
def test_a_truncated_pull_request_is_refused_by_the_parser(cut):
    import numpy as np

    from kvtransfer.ucx_protocol import Layout, PullRequest

    req = PullRequest(7, 1.0, b"tok", b"addr", Layout(2, 3, 4, 8, 4, "float32"), np.asarray([(1, 2), (5, 1)], dtype=np.int64))
    raw = req.pack()
    assert PullRequest.unpack(raw).segments.tolist() == [[1, 2], [5, 1]] and PullRequest.unpack(raw).src_block_ids == [1, 2, 5]
    with pytest.raises((ValueError, struct.error)):
        PullRequest.unpack(raw[:cut])
