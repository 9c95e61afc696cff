"""Wire formats of the UCX KV transport: server address, pull request, pull response, tags.

A pull is one request and one response over UCX tagged messages, then the data segments, then
the server's final word:

    decode (client)                                   prefill (server)
    ep = endpoint(server worker address)
    post recv(response), recv(final),
      recv(segment k) straight into its blocks
    send REQUEST (tag = server's request tag)  ──►    check token, segments, layout
                                               ◄──    RESPONSE (status) on the client's address,
                                                      tag derived from the request id
    segment k lands in the KV cache            ◄──    send segment k straight from the KV cache
                                                      (rendezvous: the client's UCX reads it with
                                                      process_vm_readv on a host, or over TCP)
                                               ◄──    FINAL: OK once every send completed and the
                                                      token is still valid, else ABORTED (why)

Nothing is read from the server's KV cache before the token checks pass. The client computes the
segments (runs of blocks consecutive on both sides, no longer than the server's limit, which is in
its address) and names them in the request, so both sides agree on every message before the
first one moves. The client reports success only on FINAL OK: a send can fail on the server (its
token revoked and its blocks freed, a timeout) while the client's read of it still completes, and
those bytes must not count. Tags: the request tag names the server instance (several servers may
share a process's UCX worker); the reply tags are `request id | index`, the request id being 44
random bits per pull.

Same host (local_read.py): a client whose host identity equals the one in the server's address asks
for a local read. The server's response then carries its pid and its cache's address, no segments
follow, and the client reads the blocks itself (process_vm_readv) and says how it went:

    send REQUEST (local read)                  ──►    check token, segments, layout; set the
                                                      pull's check word to the request id
                                               ◄──    RESPONSE OK, pid, cache address, the check
                                                      word's address
    process_vm_readv of the requested runs,
      then of the check word
    send NOTE (READ, or STREAM if the kernel   ──►    READ: the pull is over (no FINAL)
      refused the read)                        ◄──    STREAM: the segments, then FINAL, as above

The check word replaces the final word's round trip: the server zeroes it before it lets the blocks
go (revoke, its deadline, close), so a word still equal to the request id after the data was read
means the blocks were held throughout the read. The note's tag is `request id | NOTE_INDEX`, an
index no reply uses, so a client and a server that share one UCX worker never match each other's
messages.

The OK answer to a local read requested over UCX also carries the client's key to the server's
same-host channel (local_channel.py), whose name is in the server's address: later local reads from
that server send the same REQUEST, get the same RESPONSE and send the same NOTE (READ) as frames on
a Unix socket kept open between the two processes, with no UCX endpoint at all.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"TKV4"  # 2: segments sent from and into block-major caches; 3: same-host local reads; 4: their channel
REQUEST_TAG_BASE = 0x5444_4B56_0000_0000  # "TDKV" in the high half
MAX_REQUEST_BYTES = 1 << 20  # the server's receive buffer for one request
MAX_RESPONSE_BYTES = 4096
MAX_ADDRESS_BYTES = 0xFFFF  # a client address travels with a u16 length
INDEX_BITS = 20  # response = index 0, segment k = index k + 1, FINAL_INDEX = the server's final word
FINAL_INDEX = (1 << INDEX_BITS) - 1
NOTE_INDEX = FINAL_INDEX - 1  # the client's note after a local read (client → server)
MAX_SEGMENTS = NOTE_INDEX - 1


class KVTransferError(Exception):
    """A pull failed; the client stays usable (fall back to recomputing the prompt)."""


class Status(enum.IntEnum):
    OK = 0
    UNKNOWN_TOKEN = 1
    TOKEN_USED = 2
    TOKEN_EXPIRED = 3
    BLOCKS_NOT_EXPOSED = 4
    LAYOUT_MISMATCH = 5
    BAD_REQUEST = 6
    SERVER_CLOSED = 7
    ABORTED = 8  # sent on FINAL_INDEX: revoked during the pull, server closing, server timeout
    WRONG_PEER = 9  # never sent: a token presented by a client it was not bound to is dropped unanswered


class ReadOutcome(enum.IntEnum):
    """The client's note after a local read."""

    READ = 0  # every run was read (the client checked the check word itself): the pull is over
    STREAM = 1  # the kernel refused the read: send the segments as UCX messages, then FINAL


@dataclass(frozen=True)
class Layout:
    """What one block's bytes mean; two sides may exchange blocks only when theirs are equal."""

    num_layers: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    elem_size: int
    dtype: str

    _FMT = "<IIIII"

    @property
    def block_bytes(self) -> int:  # one block: [layers, 2, kv heads, block size, head dim]
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim * self.elem_size

    def pack(self) -> bytes:
        d = self.dtype.encode()
        return struct.pack(self._FMT, self.num_layers, self.num_kv_heads, self.block_size, self.head_dim, self.elem_size) + struct.pack("<B", len(d)) + d

    @classmethod
    def unpack(cls, buf: bytes, off: int) -> tuple[Layout, int]:
        vals = struct.unpack_from(cls._FMT, buf, off)
        off += struct.calcsize(cls._FMT)
        (n,) = struct.unpack_from("<B", buf, off)
        dtype = bytes(buf[off + 1 : off + 1 + n]).decode()
        return cls(*vals, dtype), off + 1 + n


def request_tag(server_id: int) -> int:
    return REQUEST_TAG_BASE | (server_id & 0xFFFF_FFFF)


def reply_tag(request_id: int, index: int) -> int:
    """index 0: the response; index k + 1: data segment k; FINAL_INDEX: the server's final word."""
    return (request_id << INDEX_BITS) | index


# -- server address ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerAddress:
    """What a client needs: the request tag, the layout, the largest segment, the UCX worker address,
    and, where the server offers local reads, its host identity and the name of its same-host
    channel (local_channel.py; b"" where none)."""

    server_id: int
    segment_blocks: int  # the most blocks one data message may carry
    layout: Layout
    ucx_address: bytes
    host: bytes = b""
    channel: bytes = b""

    def pack(self) -> bytes:
        head = MAGIC + struct.pack("<IIB", self.server_id, self.segment_blocks, len(self.host)) + self.host
        head += struct.pack("<B", len(self.channel)) + self.channel
        return head + self.layout.pack() + self.ucx_address

    @classmethod
    def unpack(cls, buf: bytes) -> ServerAddress:
        try:
            if bytes(buf[:4]) != MAGIC:
                raise ValueError("bad magic")
            server_id, segment_blocks, host_len = struct.unpack_from("<IIB", buf, 4)
            off = 13 + host_len
            host = bytes(buf[13:off])
            (channel_len,) = struct.unpack_from("<B", buf, off)
            channel = bytes(buf[off + 1 : off + 1 + channel_len])
            layout, off = Layout.unpack(buf, off + 1 + channel_len)
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise KVTransferError(f"not a Tandem UCX KV transport address (or one of another version: {e})") from None
        return cls(server_id, segment_blocks, layout, bytes(buf[off:]), host, channel)


# -- request -------------------------------------------------------------------------------------

_REQ_HEAD = "<4sQdHHIB"  # magic, request id, client timeout (s), token len, address len, n segments, local read


@dataclass(frozen=True)
class PullRequest:
    request_id: int
    timeout: float
    token: bytes
    client_address: bytes
    layout: Layout
    segments: np.ndarray  # int64 [n, 2]: (first source block, count), in the order they are sent
    local_read: bool = False  # the client asks to read the blocks itself (same host)

    @property
    def src_block_ids(self) -> list[int]:
        return [b for first, count in self.segments.tolist() for b in range(first, first + count)]

    def pack(self) -> bytes:
        head = struct.pack(_REQ_HEAD, MAGIC, self.request_id, self.timeout, len(self.token), len(self.client_address), len(self.segments), self.local_read)
        segs = np.ascontiguousarray(self.segments, dtype="<u4").tobytes()
        return head + self.token + self.client_address + self.layout.pack() + segs

    @classmethod
    def unpack(cls, buf: memoryview | bytes) -> PullRequest:
        magic, rid, timeout, tlen, alen, n, local_read = struct.unpack_from(_REQ_HEAD, buf, 0)
        if magic != MAGIC:
            raise ValueError("bad request magic")
        off = struct.calcsize(_REQ_HEAD)
        token = bytes(buf[off : off + tlen])
        off += tlen
        addr = bytes(buf[off : off + alen])
        off += alen
        layout, off = Layout.unpack(buf, off)
        segs = np.frombuffer(bytes(buf[off : off + 8 * n]), dtype="<u4").astype(np.int64)
        if len(segs) != 2 * n:
            raise ValueError("truncated request")
        return cls(rid, timeout, token, addr, layout, segs.reshape(n, 2), bool(local_read))

    @staticmethod
    def max_segments(token_len: int, address_len: int) -> int:
        return (MAX_REQUEST_BYTES - struct.calcsize(_REQ_HEAD) - token_len - address_len - 64) // 8


# -- response ------------------------------------------------------------------------------------

_RESP_HEAD = "<4sHHQQQB"  # magic, status, message length; local reads: server pid, cache and check word addresses, channel key length


@dataclass(frozen=True)
class PullResponse:
    """The server's answer to a request (index 0), or its final word (FINAL_INDEX): OK once every
    segment was sent, else why it stopped. An OK answer to a local-read request names the server's
    pid, the address of its cache's block 0 and that of the pull's check word (an int64); sent as a
    UCX message, it also carries the client's key to the server's same-host channel (local_channel.py)."""

    status: Status
    message: str = ""
    pid: int = 0
    cache_address: int = 0
    check_address: int = 0
    channel_key: bytes = b""

    def pack(self) -> bytes:
        msg = self.message.encode()[: MAX_RESPONSE_BYTES - 128]
        head = struct.pack(_RESP_HEAD, MAGIC, int(self.status), len(msg), self.pid, self.cache_address, self.check_address, len(self.channel_key))
        return head + msg + self.channel_key

    @classmethod
    def unpack(cls, buf: memoryview | bytes) -> PullResponse:
        magic, status, mlen, pid, cache_address, check_address, klen = struct.unpack_from(_RESP_HEAD, buf, 0)
        if magic != MAGIC:
            raise ValueError("bad response magic")
        off = struct.calcsize(_RESP_HEAD)
        message = bytes(buf[off : off + mlen]).decode(errors="replace")
        return cls(Status(status), message, pid, cache_address, check_address, bytes(buf[off + mlen : off + mlen + klen]))


_NOTE = "<4sB"  # magic, ReadOutcome
NOTE_BYTES = struct.calcsize(_NOTE)


def pack_note(outcome: ReadOutcome) -> bytes:
    return struct.pack(_NOTE, MAGIC, int(outcome))


def unpack_note(buf: memoryview | bytes) -> ReadOutcome:
    magic, outcome = struct.unpack_from(_NOTE, buf, 0)
    if magic != MAGIC:
        raise ValueError("bad note magic")
    return ReadOutcome(outcome)
