"""KVTransportServer: the prefill side of the UCX KV transport (see ucx_transport.py).

Serves pulls of exposed blocks: one worker-level receive per server waits for requests (tag =
this server's id), each request is checked (token known, presented by its peer, unused, unexpired,
segments of blocks exposed with it, same layout) before anything is read, then its segments are
sent straight from the KV cache (no copy: the client's UCX reads them) over a fresh error-handling
endpoint to the client's worker, a few at a time, and the pull ends with the server's final word:
OK only if every send completed and the token was still valid when they had (ucx_protocol.py says
why the client needs it). A client on this host (local_read.py) asks to read the blocks itself: it
gets this process's pid, the cache's address and a check word instead of segments; the word holds
the request id until the blocks may be released (revoke, close, the deadline), and the client's
note after its read ends the pull (or, where the kernel refused the read, the segments are sent).

Exposure: each token is bound to one peer, the decode worker it was issued for (its UCX client
address, from the PrefillRequest). The request names the client's address, so the server dials
only for a request whose token it issued (used or not) AND whose address is the bound one, and
so it dials only the bound address: a request with an unknown token, or a known token presented from
any other address (a stolen token), is dropped without a byte sent back (its sender times out;
`dropped` counts it) and burns nothing, so the real peer's pull still succeeds. Requests being
handled at once are capped (MAX_PENDING_FACTOR), so a peer that can reach the UCX port cannot
make this worker dial arbitrary addresses or pile up work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import local_channel, local_read
from .ucx_endpoint import Pipeline, TaggedEndpoint, completed
from .ucx_protocol import (
    FINAL_INDEX,
    MAX_ADDRESS_BYTES,
    MAX_REQUEST_BYTES,
    MAX_SEGMENTS,
    NOTE_BYTES,
    NOTE_INDEX,
    PullRequest,
    PullResponse,
    ReadOutcome,
    ServerAddress,
    Status,
    reply_tag,
    request_tag,
    unpack_note,
)
from .ucx_runtime import UcxRuntime
from .ucx_segments import DEFAULT_SEGMENT_BYTES, block_bytes_view, layout_of, segment_buffer

log = logging.getLogger(__name__)

_SHORT_SEND_TIMEOUT = 2.0  # a response or abort notice: eager messages, sent at once unless the peer is gone
# requests handled at once (waiting for a pull slot, or answering a refusal), per pull slot: beyond
# it new requests are dropped. Legitimate ones are bounded by the tokens this worker issued.
MAX_PENDING_FACTOR = 4
SENDS_IN_FLIGHT = 32  # segments posted ahead of the client's reads: with one block a segment (a cycled pool), UCX's per-message handshake is the cost, and more in flight hide it (4: 5.7 GB/s, 32: 6.5, 256: 7)


@dataclass
class _Grant:
    block_ids: frozenset[int]
    expires_at: float
    peer_address: bytes  # the only client address a pull with this token is served to
    used: bool = False
    revoked: bool = False  # set by revoke() while its pull runs: send no more segments, and end with ABORTED
    check_slot: int | None = None  # its local read's check word (KVTransportServer._checks), while one runs


class _Aborted(Exception):
    """The server stops a pull itself (revoked token, closing): the client is told why."""


def _bounded(timeout: float, grant: _Grant | None = None) -> float:
    """The client's timeout as the server's deadline for the pull (garbage → one hour), never past
    the grant's expiry: a request that named its peer's address without being that peer (a stolen
    token) gets sends nobody receives, and must not hold a pull slot for longer than the lease."""
    limit = timeout if 0.0 < timeout < 3600.0 else 3600.0
    if grant is not None:
        limit = min(limit, max(grant.expires_at - time.time(), 0.0) + _SHORT_SEND_TIMEOUT)
    return limit


class KVTransportServer:
    """Prefill side: serves pulls of exposed blocks of `kv_storage` (read only).

    on_pull_done(token, ok) runs on the loop that called start() once a pull that passed the token
    check has ended; from then on the pull reads none of its blocks, so they may be released.
    """

    def __init__(
        self,
        kv_storage: torch.Tensor,
        *,
        on_pull_done: Callable[[bytes, bool], None] | None = None,
        on_drop: Callable[[], None] | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_concurrent_pulls: int = 8,
        local_reads: bool = True,
    ):
        self._layout = layout_of(kv_storage)
        self._storage = kv_storage  # keeps the memory behind _blocks alive
        self._blocks = block_bytes_view(kv_storage)
        self._num_blocks = kv_storage.shape[0]
        self._segment_blocks = max(1, segment_bytes // self._layout.block_bytes)
        self._on_pull_done = on_pull_done
        self._on_drop = on_drop  # called (on the UCX loop thread) for each request dropped unanswered: a metric
        self._server_id = secrets.randbits(32)
        self._grants: dict[bytes, _Grant] = {}
        self._lock = threading.Lock()
        self._rt: UcxRuntime | None = None
        self._caller_loop: asyncio.AbstractEventLoop | None = None
        self._address: bytes | None = None
        self._accept: concurrent.futures.Future | None = None
        self._serving: set[asyncio.Task] = set()
        self._max_concurrent = max_concurrent_pulls
        # same-host clients may read the blocks themselves (local_read.py), where UCX could use CMA too
        self._host = local_read.host_identity() if local_reads and local_read.offered() else b""
        # one check word per local read in progress (ucx_protocol.py): the request id while the
        # blocks are held, zeroed before they may be released; taken under _lock, and only while the
        # pull holds one of the max_concurrent_pulls slots (_serve), so there is one word a slot
        self._checks = np.zeros(max_concurrent_pulls, np.int64)
        self._free_checks = list(range(len(self._checks)))
        self._slots = asyncio.Semaphore(max_concurrent_pulls)  # pulls served at once (bound to the UCX loop on first use)
        # the same-host channel (local_channel.py), where local reads are offered
        self._channel_secret = secrets.token_bytes(local_channel.SECRET_BYTES)
        self._channel_name = b""
        self._channel_server: asyncio.AbstractServer | None = None
        self._channel_writers: set[asyncio.StreamWriter] = set()
        self._channel_tasks: set[asyncio.Task] = set()  # one a connection (apart from _serving: an idle connection is no pending request)
        self._closed = False
        self.dropped = 0  # requests dropped unanswered: unknown token, token of another peer, or too many at once
        self.channel_pulls = 0  # pulls whose request came over the same-host channel

    async def start(self) -> None:
        self._caller_loop = asyncio.get_running_loop()
        self._rt = await asyncio.to_thread(UcxRuntime.get)
        if self._host:
            await self._rt.run(self._open_channel)
        self._address = ServerAddress(self._server_id, self._segment_blocks, self._layout, self._rt.address(), self._host, self._channel_name).pack()
        self._accept = self._rt.spawn(self._accept_loop())

    @property
    def address(self) -> bytes:
        if self._address is None:
            raise RuntimeError("KVTransportServer.start() has not been awaited")
        return self._address

    def expose(self, transfer_token: bytes, block_ids: list[int], expires_at: float, *, peer_address: bytes) -> None:
        """Allow one pull of `block_ids` (or a subset) with this token until `expires_at` (time.time()),
        by the client whose UCX worker address is `peer_address` (KVTransportClient.address) only."""
        bad = [b for b in block_ids if not 0 <= b < self._num_blocks]
        if bad:
            raise ValueError(f"block ids out of range [0, {self._num_blocks}): {bad[:8]}")
        if not peer_address or len(peer_address) > MAX_ADDRESS_BYTES:
            raise ValueError(f"peer_address must be the pulling client's UCX worker address (1..{MAX_ADDRESS_BYTES} bytes), got {len(peer_address)} bytes")
        now = time.time()
        with self._lock:
            for tok in [t for t, g in self._grants.items() if g.expires_at < now]:
                del self._grants[tok]
            self._grants[bytes(transfer_token)] = _Grant(frozenset(int(b) for b in block_ids), float(expires_at), bytes(peer_address))

    def revoke(self, transfer_token: bytes) -> None:
        """Forget the token; a pull already running with it sends no further segment and fails (its
        client gets ABORTED, never OK, so segments read after the blocks were freed never count)."""
        with self._lock:
            grant = self._grants.pop(bytes(transfer_token), None)
            if grant is not None:
                grant.revoked = True
                if grant.check_slot is not None:  # a local read: it fails its check from now on
                    self._checks[grant.check_slot] = 0

    async def close(self) -> None:
        """Stop serving: running pulls are aborted (their clients get KVTransferError at once); later
        requests go unanswered (their clients time out). The UCX runtime stays for the process."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for g in self._grants.values():
                g.revoked = True
            self._grants.clear()
            self._checks[:] = 0
        if self._rt is not None:
            await self._rt.run(self._shutdown)

    # -- UCX loop ----------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self._channel_server is not None:
            self._channel_server.close()  # stops listening; the connections are closed here (3.11 keeps them)
            for writer in list(self._channel_writers):
                writer.close()
        # wake the accept loop with a message to our own request tag (a worker-level receive
        # cannot be cancelled on its own); it sees _closed and ends, dropping its reference to us
        if self._accept is not None and not self._accept.done():
            ep = None
            try:
                ep = TaggedEndpoint(self._rt, self._rt.address())
                await completed(ep.send(np.zeros(8, np.uint8), request_tag(self._server_id)), _SHORT_SEND_TIMEOUT)
                await asyncio.wait_for(asyncio.wrap_future(self._accept), _SHORT_SEND_TIMEOUT)
            except Exception as e:  # noqa: BLE001
                log.warning("KV server %08x: accept loop did not stop: %s", self._server_id, e)
            finally:
                if ep is not None:
                    ep.abort_soon()
        if self._serving or self._channel_tasks:
            await asyncio.wait([*self._serving, *self._channel_tasks], timeout=10)

    async def _accept_loop(self) -> None:
        ctx, tag = self._rt.ctx, request_tag(self._server_id)
        buf = np.zeros(MAX_REQUEST_BYTES, np.uint8)
        while not self._closed:
            try:
                await ctx.recv(buf, tag)
            except Exception as e:  # noqa: BLE001 - an oversized message
                log.debug("KV server %08x: request receive failed: %s", self._server_id, e)
                continue
            if self._closed:
                break
            try:
                req = PullRequest.unpack(buf)
            except Exception as e:  # noqa: BLE001
                log.warning("KV server %08x: dropping a malformed request: %s", self._server_id, e)
                continue
            if len(self._serving) >= MAX_PENDING_FACTOR * self._max_concurrent:
                self._drop(req, f"{len(self._serving)} requests in progress")
                continue
            task = asyncio.get_running_loop().create_task(self._serve(req))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    # -- the same-host channel (local_channel.py), on the UCX loop ---------------------------------

    async def _open_channel(self) -> None:
        name = local_channel.channel_name(self._server_id)
        try:
            self._channel_server = await asyncio.start_unix_server(self._serve_channel, sock=local_channel.listening_socket(name))
        except OSError as e:  # local reads go on as UCX requests
            log.warning("KV server %08x: no same-host channel (%s); local reads are requested over UCX", self._server_id, e)
            return
        self._channel_name = name

    async def _serve_channel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: its hello, then its pulls one at a time, until it closes or breaks the protocol."""
        task = asyncio.current_task()
        if self._closed or len(self._channel_writers) >= MAX_PENDING_FACTOR * self._max_concurrent:
            writer.close()  # the client's hello gets no answer, and its pull goes over UCX
            return
        self._channel_writers.add(writer)
        self._channel_tasks.add(task)
        try:
            async with asyncio.timeout(local_channel.HELLO_TIMEOUT):
                hello = local_channel.Hello.unpack(await local_channel.read_frame(reader, local_channel.MAX_HELLO_BYTES))
            key = local_channel.channel_key(self._channel_secret, hello.client_address)
            if not hmac.compare_digest(hello.key, key):
                local_channel.write_frame(writer, PullResponse(Status.BAD_REQUEST, "unknown channel key").pack())
                return
            local_channel.write_frame(writer, PullResponse(Status.OK).pack())
            while not self._closed:
                req = PullRequest.unpack(await local_channel.read_frame(reader))
                if req.client_address != hello.client_address or not req.local_read:
                    log.warning("KV server %08x: channel request %x is not a local read by the connection's peer; closing it", self._server_id, req.request_id)
                    return
                await self._serve_channel_pull(req, reader, writer)
        except (EOFError, OSError, ValueError, struct.error, TimeoutError) as e:  # the peer left, or broke the protocol
            log.debug("KV server %08x: channel connection ended: %s: %s", self._server_id, type(e).__name__, e)
        finally:
            writer.close()
            self._channel_writers.discard(writer)
            self._channel_tasks.discard(task)

    async def _serve_channel_pull(self, req: PullRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A local read requested over the channel: checked as a UCX request is, answered with the
        pid, cache and check word; the client's READ note ends it. Anything else from the client (the
        connection closed, a timeout) fails the pull and ends the connection."""
        status, message, grant = self._check(req)
        if status is not Status.OK:  # the connection proved its address: every refusal is answered
            local_channel.write_frame(writer, PullResponse(status, message).pack())
            return
        if not await self._acquire_slot(req, grant):
            local_channel.write_frame(writer, PullResponse(Status.ABORTED, "the server's deadline for this pull passed while it waited for a pull slot").pack())
            return
        ok = False
        self.channel_pulls += 1
        try:
            async with asyncio.timeout(_bounded(req.timeout, grant) + 1.0):
                local_channel.write_frame(writer, self._local_read_answer(grant, req.request_id).pack())
                note = unpack_note(await local_channel.read_frame(reader))
            ok = note is ReadOutcome.READ and not (grant.revoked or self._closed)
        finally:
            self._release_check(grant)  # before the blocks may go: a read still running fails its check
            self._notify(req.token, ok)
            self._slots.release()

    def _drop(self, req: PullRequest, why: str) -> None:
        self.dropped += 1
        if self._on_drop is not None:
            with contextlib.suppress(Exception):  # a metric must never take the accept loop down
                self._on_drop()
        if self.dropped & (self.dropped - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a flood cannot flood the log
            log.warning("KV server %08x: dropped request %x unanswered (%s); %d dropped so far", self._server_id, req.request_id, why, self.dropped)

    def _check(self, req: PullRequest) -> tuple[Status, str, _Grant | None]:
        with self._lock:  # the token and its peer first: nothing else is answered to anyone else
            grant = self._grants.get(req.token)
            if grant is None:
                return Status.UNKNOWN_TOKEN, "unknown transfer token (never exposed, revoked, or expired)", None
            if req.client_address != grant.peer_address:  # not secret (it is in etcd): no constant-time compare needed
                return Status.WRONG_PEER, "transfer token presented by a client it was not issued to", None
        if req.layout != self._layout:
            return Status.LAYOUT_MISMATCH, f"KV layout differs: client {req.layout}, server {self._layout}", None
        if self._closed:
            return Status.SERVER_CLOSED, "server is closed", None
        if req.local_read and not self._host:
            return Status.BAD_REQUEST, "this server does not offer local reads (its address names no host)", None
        bad = self._bad_segments(req.segments)
        if bad:
            return Status.BAD_REQUEST, bad, None
        now = time.time()
        with self._lock:
            grant = self._grants.get(req.token)
            if grant is None or req.client_address != grant.peer_address:  # revoked (and re-exposed) meanwhile
                return Status.UNKNOWN_TOKEN, "unknown transfer token (never exposed, revoked, or expired)", None
            if grant.used:
                return Status.TOKEN_USED, "transfer token already used (a token allows one pull)", None
            if now > grant.expires_at:
                del self._grants[req.token]
                return Status.TOKEN_EXPIRED, f"transfer token expired {now - grant.expires_at:.1f} s ago", None
            missing = sorted(set(req.src_block_ids) - grant.block_ids)
            if missing:
                more = "..." if len(missing) > 8 else ""
                return Status.BLOCKS_NOT_EXPOSED, f"blocks {missing[:8]}{more} were not exposed with this token", None
            grant.used = True
            return Status.OK, "", grant

    def _bad_segments(self, segs: np.ndarray) -> str:
        """Why these (first block, count) segments cannot be served, or "" when they can."""
        if not 0 < len(segs) <= MAX_SEGMENTS:
            return f"bad number of segments: {len(segs)}"
        first, count = segs[:, 0], segs[:, 1]
        if (count < 1).any() or (count > self._segment_blocks).any():
            return f"segment lengths must be 1..{self._segment_blocks} blocks, got {int(count.min())}..{int(count.max())}"
        if (first + count > self._num_blocks).any():
            return f"segments reach past the cache's {self._num_blocks} blocks"
        return ""

    async def _serve(self, req: PullRequest) -> None:
        status, message, grant = self._check(req)
        if status in (Status.UNKNOWN_TOKEN, Status.WRONG_PEER):  # never dial an address for a sender without its own token
            return self._drop(req, message)
        if status is not Status.OK:
            return await self._transfer(req, status, message, None)
        if not await self._acquire_slot(req, grant):
            return
        try:
            await self._transfer(req, status, message, grant)
        finally:
            self._slots.release()

    async def _acquire_slot(self, req: PullRequest, grant: _Grant) -> bool:
        """One of the pull slots, within the pull's deadline; False (the pull reported failed) where
        none came free in time."""
        try:
            async with asyncio.timeout(_bounded(req.timeout, grant)):
                await self._slots.acquire()
        except TimeoutError:
            self._notify(req.token, False)
            return False
        return True

    async def _transfer(self, req: PullRequest, status: Status, message: str, grant: _Grant | None) -> None:
        rid, ep, ok, sends = req.request_id, None, False, None
        segs = req.segments.tolist()

        def send_segment(k: int) -> asyncio.Future:
            self._check_still_valid(grant)  # a revoked token: no further segment, the pull fails
            first, count = segs[k]
            return ep.send(segment_buffer(self._blocks, first, count), reply_tag(rid, k + 1))

        try:
            # _check passed the token's peer check: req.client_address is the address the token is bound to
            ep = TaggedEndpoint(self._rt, req.client_address)
            if status is not Status.OK:
                await completed(ep.send(PullResponse(status, message).pack(), reply_tag(rid, 0)), _SHORT_SEND_TIMEOUT)
                return
            async with asyncio.timeout(_bounded(req.timeout, grant) + 1.0):
                if req.local_read:  # the client reads the blocks itself, then says how it went
                    note_buf = np.zeros(NOTE_BYTES, np.uint8)
                    note = ep.recv(note_buf, reply_tag(rid, NOTE_INDEX))
                    key = local_channel.channel_key(self._channel_secret, req.client_address) if self._channel_name else b""
                    response = ep.send(self._local_read_answer(grant, rid, key).pack(), reply_tag(rid, 0))
                    await completed(note)
                    stream = unpack_note(note_buf) is ReadOutcome.STREAM  # the kernel refused the read
                    if not stream:  # the client judged the read by the check word: no final word
                        await completed(response)
                        ok = not (grant.revoked or self._closed)
                        return
                else:
                    response = ep.send(PullResponse(Status.OK).pack(), reply_tag(rid, 0))  # the segments follow at once
                    stream = True
                if stream:
                    sends = Pipeline(len(segs), SENDS_IN_FLIGHT, send_segment)
                    await completed(sends.finished)
                await completed(response)
                # every read of the cache has completed; valid now means the blocks were held throughout
                self._check_still_valid(grant)
                await completed(ep.send(PullResponse(Status.OK).pack(), reply_tag(rid, FINAL_INDEX)))
            ok = True
        except BaseException as e:  # noqa: BLE001 - a failed pull must never take the server down
            log.info("KV server %08x: pull %x failed: %s: %s", self._server_id, rid, type(e).__name__, e)
            if isinstance(e, (_Aborted, TimeoutError)) and ep is not None:
                with contextlib.suppress(BaseException):  # tell the client now rather than at its timeout
                    why = str(e) if isinstance(e, _Aborted) else "the server's deadline for this pull passed"
                    await completed(ep.send(PullResponse(Status.ABORTED, why).pack(), reply_tag(rid, FINAL_INDEX)), _SHORT_SEND_TIMEOUT)
            if isinstance(e, asyncio.CancelledError) and not self._closed:
                raise
        finally:
            if sends is not None:
                sends.stop()
            if grant is not None:
                self._release_check(grant)  # before the blocks may go: a read still running fails its check
                self._notify(req.token, ok)
            if ep is not None:
                ep.abort_soon()  # cancels the sends still posted (a failed pull's): their futures end with the abort

    def check_integrity(self) -> None:
        """Every check word is free (and zero) or held by exactly one grant."""
        with self._lock:
            held = [g.check_slot for g in self._grants.values() if g.check_slot is not None]
            free = self._free_checks
            assert len(set(free)) == len(free) and not set(free) & set(held), "a check word is both free and held, or free twice"
            assert len(free) + len(held) <= len(self._checks), "more check words than slots"
            assert not self._checks[free].any(), "a free check word is not zero"

    def _local_read_answer(self, grant: _Grant, request_id: int, channel_key: bytes = b"") -> PullResponse:
        """The OK answer to a local read: this process, its cache and the pull's check word (claimed here)."""
        check = self._claim_check(grant, request_id)
        return PullResponse(Status.OK, pid=os.getpid(), cache_address=self._blocks.ctypes.data, check_address=check, channel_key=channel_key)

    def _claim_check(self, grant: _Grant, request_id: int) -> int:
        """A check word for this pull's local read, set to the request id unless the grant is already
        revoked; its address."""
        with self._lock:
            slot = grant.check_slot = self._free_checks.pop()  # never empty: one word per pull slot
            self._checks[slot] = 0 if grant.revoked or self._closed else request_id
        return self._checks.ctypes.data + slot * self._checks.itemsize

    def _release_check(self, grant: _Grant) -> None:
        with self._lock:
            if grant.check_slot is not None:
                self._checks[grant.check_slot] = 0
                self._free_checks.append(grant.check_slot)
                grant.check_slot = None

    def _check_still_valid(self, grant: _Grant) -> None:
        if grant.revoked or self._closed:
            raise _Aborted("the transfer token was revoked during the pull" if grant.revoked else "the server is closing")

    def _notify(self, token: bytes, ok: bool) -> None:
        cb, loop = self._on_pull_done, self._caller_loop
        if cb is None or loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(cb, token, ok)
