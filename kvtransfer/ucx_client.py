"""KVTransportClient: the decode side of the UCX KV transport (see ucx_transport.py).

A pull runs on the UCX loop over its own error-handling endpoint to the server's worker: it posts
receives for the response, the server's final word and the first segments, each segment straight
into its destination blocks of the cache, sends the request, and posts further segments as earlier
ones land. It succeeds only on the server's final OK. On the server's host (local_read.py) it
instead reads the blocks itself with process_vm_readv once the server has answered, then the
server's check word, and succeeds only if that word still holds the request id. On any failure it
aborts the endpoint and waits until UCX has completed (or cancelled) every receive it posted, and
its read has ended, before it reports: both write into the cache, and the caller frees the
destination blocks as soon as the pull raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable

import numpy as np
import torch

from . import local_channel, local_read
from .ucx_endpoint import Pipeline, TaggedEndpoint, completed
from .ucx_protocol import (
    FINAL_INDEX,
    MAX_RESPONSE_BYTES,
    MAX_SEGMENTS,
    NOTE_INDEX,
    KVTransferError,
    PullRequest,
    PullResponse,
    ReadOutcome,
    ServerAddress,
    Status,
    pack_note,
    reply_tag,
    request_tag,
)
from .ucx_runtime import LoopTask, UcxRuntime
from .ucx_segments import block_bytes_view, layout_of, segment_buffer, segments

log = logging.getLogger(__name__)

_CALLER_GRACE = 5.0  # extra time the caller's loop waits for the UCX loop beyond the pull timeout
RECEIVES_IN_FLIGHT = 32  # receives posted ahead of the segment being read (see ucx_server.SENDS_IN_FLIGHT)
_RECEIVES_SETTLE = 10.0  # bound on waiting for UCX to finish the receives of an aborted endpoint
_RELEASED_DURING_READ = "server aborted the pull: it released the blocks during the read (the transfer token was revoked, or its deadline passed)"


class KVTransportClient:
    """Decode side: pulls blocks from servers into `kv_storage`."""

    def __init__(self, kv_storage: torch.Tensor, *, local_reads: bool = True, on_channel_pull: Callable[[], None] | None = None):
        """local_reads=False: every pull as UCX messages, also from a server on this host.
        on_channel_pull: called (on the UCX loop's thread) for each pull that landed after being
        requested over a server's same-host channel (local_channel.py): a metric."""
        self._layout = layout_of(kv_storage)
        self._storage = kv_storage  # keeps the memory behind _blocks alive
        self._blocks = block_bytes_view(kv_storage)
        self._num_blocks = kv_storage.shape[0]
        self._rt: UcxRuntime | None = None
        self._inflight: set[LoopTask] = set()
        self._closed = False
        self._host = local_read.host_identity() if local_reads else b""
        self._stream_only: set[int] = set()  # server ids whose memory the kernel would not let us read
        self._channels = local_channel.Channels()  # servers' same-host channels; used on the UCX loop only
        self.channel_pulls = 0  # pulls requested over a server's same-host channel
        self._on_channel_pull = on_channel_pull

    async def start(self) -> None:
        self._rt = await asyncio.to_thread(UcxRuntime.get)

    @property
    def address(self) -> bytes:
        """This client's identity on the data plane: the UCX worker address its pulls name
        (PullRequest.client_address), to which a server binds the tokens it issues for us."""
        if self._rt is None:
            raise RuntimeError("KVTransportClient.start() has not been awaited")
        return self._rt.address()

    async def pull(self, server_address: bytes, transfer_token: bytes, src_block_ids: list[int], dst_block_ids: list[int], timeout: float) -> str:
        """Copy the server's blocks src_block_ids into this cache's dst_block_ids; KVTransferError on failure.
        Returns how they came: "local" (read from the server's memory on this host) or "messages"
        (UCX messages: another host, local reads off, or the kernel refused the read); "none" when
        there was nothing to pull.

        When it raises, no write into this cache is running any more (the destination blocks may be
        freed at once); the client stays usable."""
        if self._rt is None or self._closed:
            raise KVTransferError("KVTransportClient is not started or is closed")
        src, dst = [int(b) for b in src_block_ids], [int(b) for b in dst_block_ids]
        if len(src) != len(dst):
            raise KVTransferError(f"{len(src)} source blocks but {len(dst)} destination blocks")
        bad = [b for b in dst if not 0 <= b < self._num_blocks] + [b for b in src if b < 0]
        if bad:
            raise KVTransferError(f"block ids out of range: {bad[:8]}")
        if len(set(dst)) != len(dst):
            raise KVTransferError("destination block ids repeat: two segments would write the same block")
        if not src:
            return "none"
        addr = ServerAddress.unpack(server_address)
        if addr.layout != self._layout:
            raise KVTransferError(f"KV layout differs: server {addr.layout}, client {self._layout}")
        if addr.segment_blocks < 1:
            raise KVTransferError("the server's address allows no blocks per segment")
        segs = segments(src, dst, addr.segment_blocks)
        req = PullRequest(
            secrets.randbits(44),
            float(timeout),
            bytes(transfer_token),
            self._rt.address(),
            self._layout,
            np.asarray([(s, n) for s, _, n in segs], dtype=np.int64),
            local_read=bool(self._host) and addr.host == self._host and addr.server_id not in self._stream_only,
        )
        if len(segs) > min(MAX_SEGMENTS, PullRequest.max_segments(len(req.token), len(req.client_address))):
            raise KVTransferError(f"too many blocks for one pull: {len(src)} in {len(segs)} segments")

        inner = self._rt.start(self._pull_by_channel_or_ucx(addr, req, [(d, n) for _, d, n in segs], float(timeout)))
        self._inflight.add(inner)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(inner.ended)), timeout + _CALLER_GRACE + _RECEIVES_SETTLE)
        except (TimeoutError, asyncio.CancelledError) as e:
            inner.cancel()  # the UCX side stops, and waits out every receive or read into our cache, before it ends
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(inner.ended)), _CALLER_GRACE + _RECEIVES_SETTLE)
            if isinstance(e, asyncio.CancelledError):
                if asyncio.current_task().cancelling() or not self._closed:
                    raise
                raise KVTransferError("the client was closed during the pull") from None
            raise KVTransferError(f"pull did not finish within {timeout} s") from None
        finally:
            self._inflight.discard(inner)

    async def close(self) -> None:
        """Cancel running pulls (they raise KVTransferError or CancelledError); the UCX runtime stays."""
        self._closed = True
        pending = [asyncio.wrap_future(job.ended) for job in self._inflight]
        for job in list(self._inflight):
            job.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_CALLER_GRACE + _RECEIVES_SETTLE)
        if self._rt is not None:
            await self._rt.run(self._close_channels)

    async def _close_channels(self) -> None:
        self._channels.close()

    # -- UCX loop ----------------------------------------------------------------------------

    async def _pull_by_channel_or_ucx(self, addr: ServerAddress, req: PullRequest, dst: list[tuple[int, int]], timeout: float) -> str:
        """A local read whose server handed us its channel's key goes over the channel; every other
        pull, and one whose channel cannot be had (unreachable, full), as a UCX request."""
        if req.local_read and addr.channel and self._channels.knows(addr.channel):
            try:
                async with asyncio.timeout(timeout):
                    conn = await self._channels.take(addr.channel, req.client_address)
            except local_channel.ChannelRefused as e:
                log.info("KV pull: server %08x's channel: %s; requesting over UCX", addr.server_id, e)
            except TimeoutError:
                raise KVTransferError(f"pull timed out after {timeout} s while connecting to the server's channel") from None
            else:
                return await self._pull_over_channel(conn, addr, req, dst, timeout)
        return await self._pull(addr, req, dst, timeout)

    def _read_locally(self, reply: PullResponse, req: PullRequest, dst: list[tuple[int, int]]) -> asyncio.Future:
        """The requested runs copied from the server's cache by a worker thread (local_read.py); its
        result is the server's check word as read after them."""
        bb, here, into = self._layout.block_bytes, self._blocks.ctypes.data, np.asarray(dst, np.int64)
        remote = np.stack([reply.cache_address + req.segments[:, 0] * bb, req.segments[:, 1] * bb], axis=1)
        local = np.stack([here + into[:, 0] * bb, into[:, 1] * bb], axis=1)
        return asyncio.get_running_loop().run_in_executor(None, local_read.read_runs_and_check, reply.pid, remote, local, reply.check_address)

    async def _pull_over_channel(
        self, conn: local_channel.Connection, addr: ServerAddress, req: PullRequest, dst: list[tuple[int, int]], timeout: float
    ) -> str:
        """Request, answer, read, note, on one connection of the server's channel (local_channel.py).
        The connection is kept only when the exchange ended cleanly; otherwise it is closed, which
        ends the pull on the server's side."""
        rid, reading, clean, stage = req.request_id, None, False, "waiting for the server's answer on its channel"
        self.channel_pulls += 1
        try:
            async with asyncio.timeout(timeout):
                conn.send(req.pack())
                reply = PullResponse.unpack(await conn.receive())
                if reply.status is not Status.OK:
                    clean = True
                    raise KVTransferError(f"server refused the pull ({reply.status.name}): {reply.message}")
                stage = "reading the blocks from the server's memory"
                reading = self._read_locally(reply, req, dst)
                await asyncio.wait((reading,))  # never cancelled: the thread writes into the cache
                if isinstance(refused := reading.exception(), local_read.LocalReadError):
                    # the first pull's read was allowed (it handed us the key): the server's rights changed
                    self._stream_only.add(addr.server_id)
                    raise KVTransferError(f"the kernel refused to read the server's memory ({refused}); later pulls from it go as UCX messages")
                held = reading.result() == rid
                conn.send(pack_note(ReadOutcome.READ))  # ends the server's side
                clean = True
                if not held:
                    raise KVTransferError(_RELEASED_DURING_READ)
                if self._on_channel_pull is not None:
                    with contextlib.suppress(Exception):  # a metric must never fail a pull
                        self._on_channel_pull()
                return "local"
        except KVTransferError:
            raise
        except TimeoutError:
            raise KVTransferError(f"pull timed out after {timeout} s while {stage}") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the server died, or broke the protocol
            raise KVTransferError(f"pull failed while {stage}: server gone or channel broken ({type(e).__name__}: {e})") from e
        finally:
            if reading is not None and not reading.done():  # cancelled mid-read: let the copy end first
                await asyncio.wait((reading,), timeout=_RECEIVES_SETTLE)
            if clean:
                self._channels.give_back(addr.channel, conn)
            else:
                conn.close()

    async def _pull(self, addr: ServerAddress, req: PullRequest, dst: list[tuple[int, int]], timeout: float) -> str:
        rid, n = req.request_id, len(dst)
        ep, ok, stage = None, False, "connecting"
        resp = final = None
        resp_buf, final_buf = np.zeros(MAX_RESPONSE_BYTES, np.uint8), np.zeros(MAX_RESPONSE_BYTES, np.uint8)
        segments: Pipeline | None = None
        reading: asyncio.Future | None = None  # a local read: a worker thread writing into the cache

        def receive_segment(k: int) -> asyncio.Future:  # straight into its destination blocks
            first, count = dst[k]
            return ep.recv(segment_buffer(self._blocks, first, count), reply_tag(rid, k + 1))

        def server_gave_up() -> KVTransferError | None:
            """The server's final word once it has come: None for OK, else why it stopped."""
            final.result()  # an endpoint error raises here
            reply = PullResponse.unpack(final_buf)
            return None if reply.status is Status.OK else KVTransferError(f"server aborted the pull: {reply.message}")

        async def unless_server_gave_up(fut: asyncio.Future) -> None:
            """Wait for `fut`, unless the server's final word comes first and is not OK (an OK one
            means every send completed, so every receive completes too)."""
            if not fut.done() and not final.done():
                await asyncio.wait((fut, final), return_when=asyncio.FIRST_COMPLETED)
            if not fut.done() and (error := server_gave_up()) is not None:
                raise error
            await completed(fut)

        def where() -> str:
            return f"receiving segment {segments.completed + 1}/{n}" if stage == "receiving" else stage

        try:
            async with asyncio.timeout(timeout):
                ep = TaggedEndpoint(self._rt, addr.ucx_address)
                resp = ep.recv(resp_buf, reply_tag(rid, 0))
                final = ep.recv(final_buf, reply_tag(rid, FINAL_INDEX))
                stage = "sending the request"
                request = ep.send(req.pack(), request_tag(addr.server_id))
                # the segments' receives are posted while the request travels and the server checks
                # it: a segment that came first would wait in UCX's unexpected queue (for a
                # rendezvous message, only its small header)
                if not req.local_read:
                    segments = Pipeline(n, RECEIVES_IN_FLIGHT, receive_segment)
                await completed(request)
                stage = "waiting for the server's answer"
                await unless_server_gave_up(resp)
                reply = PullResponse.unpack(resp_buf)
                if reply.status is not Status.OK:
                    raise KVTransferError(f"server refused the pull ({reply.status.name}): {reply.message}")
                if req.local_read:
                    stage = "reading the blocks from the server's memory"
                    reading = self._read_locally(reply, req, dst)
                    await asyncio.wait((reading,))  # never cancelled: the thread writes into the cache
                    if isinstance(refused := reading.exception(), local_read.LocalReadError):
                        # the kernel would not let us read (ptrace rights): this pull and every later
                        # one from this server go as UCX messages
                        log.info("KV pull: local read from server %08x refused (%s); using UCX messages", addr.server_id, refused)
                        self._stream_only.add(addr.server_id)
                        segments = Pipeline(n, RECEIVES_IN_FLIGHT, receive_segment)
                        ep.send(pack_note(ReadOutcome.STREAM), reply_tag(rid, NOTE_INDEX))  # a failed send fails the endpoint, and so `final`
                    else:
                        held = reading.result() == rid
                        note = ep.send(pack_note(ReadOutcome.READ), reply_tag(rid, NOTE_INDEX))  # ends the server's side
                        if not held:
                            raise KVTransferError(_RELEASED_DURING_READ)
                        # done: the endpoint goes once the note is out (aborting now could cancel it)
                        note.add_done_callback(lambda _: ep.abort())
                        self._channels.learn(addr.channel, reply.channel_key)  # later pulls: its channel
                        ok = True
                        return "local"
                if segments is not None:
                    stage = "receiving"
                    await unless_server_gave_up(segments.finished)
                stage = "waiting for the server's final word"
                await asyncio.wait((final,))
                if (error := server_gave_up()) is not None:
                    raise error
            ok = True
            return "messages"
        except KVTransferError:
            raise
        except TimeoutError:
            raise KVTransferError(f"pull timed out after {timeout} s while {where()}") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - UCX errors: the server died or the connection broke
            raise KVTransferError(f"pull failed while {where()}: server gone or connection broken ({type(e).__name__}: {e})") from e
        finally:
            if reading is not None and not reading.done():  # cancelled mid-read: let the copy end first
                await asyncio.wait((reading,), timeout=_RECEIVES_SETTLE)
            in_flight = []
            if segments is not None:
                segments.stop()
                in_flight = list(segments.in_flight.values())
            if ok:
                if segments is not None:  # (a local read's endpoint goes once its note is out)
                    ep.abort_soon()
            else:
                await self._settle(ep, [f for f in (resp, final, *in_flight) if f is not None and not f.done()])

    async def _settle(self, ep: TaggedEndpoint | None, pending: list[asyncio.Future]) -> None:
        """After a failed pull: abort the endpoint, which cancels its receives, and wait until UCX has
        finished with every one of them (a segment being read completes first), so nothing writes
        into the cache once the pull has raised."""
        if ep is not None:
            ep.abort()
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=_RECEIVES_SETTLE)
        if still:  # not seen with UCX 1.21; would mean UCX kept a receive into the cache alive
            log.error("KV pull: %d receives into the KV cache still pending %.0f s after aborting their endpoint", len(still), _RECEIVES_SETTLE)
