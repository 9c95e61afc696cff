"""KVTransportClient: the decode side of the UCX KV transport (see ucx_transport.py).

A pull runs on the UCX loop over its own error-handling endpoint to the server's worker: it posts
receives for the response, the first chunks and the server's abort notice, sends the request,
then scatters each chunk into the cache while the next one arrives. Any failure cancels the
endpoint's requests and waits for a running scatter before it is reported.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import secrets

import numpy as np
import torch

from .ucx_protocol import ABORT_INDEX, MAX_CHUNKS, MAX_RESPONSE_BYTES, KVTransferError, PullRequest, PullResponse, ServerAddress, Status, reply_tag, request_tag
from .ucx_runtime import CopyTask, UcxRuntime, abort_soon, ucx_address
from .ucx_staging import StagingPool, as_ucx_buffer, layout_of, run_view, scatter

_CALLER_GRACE = 5.0  # extra time the caller's loop waits for the UCX loop beyond the pull timeout


class KVTransportClient:
    """Decode side: pulls blocks from servers into `kv_storage`."""

    def __init__(self, kv_storage: torch.Tensor):
        self._layout = layout_of(kv_storage)
        self._storage = kv_storage  # keeps the memory behind _runs alive
        self._runs = run_view(kv_storage)
        self._num_blocks = kv_storage.shape[3]
        self._pools: dict[int, StagingPool] = {}
        self._rt: UcxRuntime | None = None
        self._inflight: set[concurrent.futures.Future] = set()
        self._closed = False

    async def start(self) -> None:
        self._rt = await asyncio.to_thread(UcxRuntime.get)

    @property
    def address(self) -> bytes:
        """This client's identity on the data plane: the UCX worker address its pulls name
        (PullRequest.client_address), to which a server binds the tokens it issues for us."""
        if self._rt is None:
            raise RuntimeError("KVTransportClient.start() has not been awaited")
        return self._rt.address()

    async def pull(self, server_address: bytes, transfer_token: bytes, src_block_ids: list[int], dst_block_ids: list[int], timeout: float) -> None:
        """Copy the server's blocks src_block_ids into this cache's dst_block_ids; KVTransferError on failure.

        When it raises, no copy into this cache is running any more (the destination blocks may be
        freed at once); the client stays usable."""
        if self._rt is None or self._closed:
            raise KVTransferError("KVTransportClient is not started or is closed")
        src, dst = [int(b) for b in src_block_ids], [int(b) for b in dst_block_ids]
        if len(src) != len(dst):
            raise KVTransferError(f"{len(src)} source blocks but {len(dst)} destination blocks")
        bad = [b for b in dst if not 0 <= b < self._num_blocks] + [b for b in src if b < 0]
        if bad:
            raise KVTransferError(f"block ids out of range: {bad[:8]}")
        if not src:
            return
        addr = ServerAddress.unpack(server_address)
        if addr.layout != self._layout:
            raise KVTransferError(f"KV layout differs: server {addr.layout}, client {self._layout}")
        if addr.chunk_blocks < 1 or -(-len(src) // addr.chunk_blocks) > MAX_CHUNKS:
            raise KVTransferError(f"too many blocks for one pull: {len(src)}")
        req = PullRequest(secrets.randbits(44), float(timeout), bytes(transfer_token), self._rt.address(), self._layout, np.asarray(src, dtype=np.int64))
        if len(src) > PullRequest.max_blocks(len(req.token), len(req.client_address)):
            raise KVTransferError(f"too many blocks for one pull: {len(src)}")

        inner = self._rt.spawn(self._pull(addr, req, dst, float(timeout)))
        self._inflight.add(inner)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(inner)), timeout + _CALLER_GRACE)
        except (TimeoutError, asyncio.CancelledError) as e:
            inner.cancel()  # the UCX side stops, and finishes any copy into our cache, before it ends
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.wrap_future(inner), _CALLER_GRACE)
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
        pending = [asyncio.wrap_future(f) for f in self._inflight]
        for f in list(self._inflight):
            f.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_CALLER_GRACE)

    # -- UCX loop ----------------------------------------------------------------------------

    def _pool(self, chunk_blocks: int) -> StagingPool:
        pool = self._pools.get(chunk_blocks)
        if pool is None:
            pool = StagingPool(self._layout, chunk_blocks * self._layout.block_bytes)
            if len(self._pools) < 8:
                self._pools[chunk_blocks] = pool
        return pool

    async def _pull(self, addr: ServerAddress, req: PullRequest, dst: list[int], timeout: float) -> None:
        rid, cb = req.request_id, addr.chunk_blocks
        n = -(-len(dst) // cb)
        pool = self._pool(cb)
        staging, slots = pool.take(), pool.slots
        ep, ok, stage = None, False, "connecting"
        copy = CopyTask(self._rt)
        recvs: dict[object, asyncio.Task] = {}
        resp_buf, abort_buf = np.zeros(MAX_RESPONSE_BYTES, np.uint8), np.zeros(MAX_RESPONSE_BYTES, np.uint8)

        def post(k: int) -> None:
            view = staging.slots[k % slots][: len(dst[k * cb : (k + 1) * cb])]
            recvs[k] = asyncio.ensure_future(ep.recv(as_ucx_buffer(view), tag=reply_tag(rid, k + 1), force_tag=True))

        async def arrived(key: object) -> None:
            """Wait for receive `key`, or raise the server's abort notice if that comes first."""
            done, _ = await asyncio.wait({recvs[key], recvs["abort"]}, return_when=asyncio.FIRST_COMPLETED)
            if recvs[key] in done:
                recvs.pop(key).result()
                return
            recvs.pop("abort").result()  # an endpoint error raises here
            raise KVTransferError(f"server aborted the pull: {PullResponse.unpack(abort_buf).message}")

        try:
            async with asyncio.timeout(timeout):
                ep = await self._rt.ctx.create_endpoint_from_worker_address(ucx_address(addr.ucx_address), endpoint_error_handling=True)
                recvs["resp"] = asyncio.ensure_future(ep.recv(resp_buf, tag=reply_tag(rid, 0), force_tag=True))
                recvs["abort"] = asyncio.ensure_future(ep.recv(abort_buf, tag=reply_tag(rid, ABORT_INDEX), force_tag=True))
                for k in range(min(slots, n)):
                    post(k)
                stage = "sending the request"
                await ep.send(req.pack(), tag=request_tag(addr.server_id), force_tag=True)
                stage = "waiting for the server's answer"
                await arrived("resp")
                resp = PullResponse.unpack(resp_buf)
                if resp.status is not Status.OK:
                    raise KVTransferError(f"server refused the pull ({resp.status.name}): {resp.message}")
                for k in range(n):
                    stage = f"receiving chunk {k + 1}/{n}"
                    await arrived(k)
                    chunk = dst[k * cb : (k + 1) * cb]
                    await copy.run(scatter, self._runs, chunk, staging.slots[k % slots][: len(chunk)])
                    if k + slots < n:
                        post(k + slots)
            ok = True
        except KVTransferError:
            raise
        except TimeoutError:
            raise KVTransferError(f"pull timed out after {timeout} s while {stage}") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - UCX errors: the server died or the connection broke
            raise KVTransferError(f"pull failed while {stage}: server gone or connection broken ({type(e).__name__}: {e})") from e
        finally:
            for t in recvs.values():
                t.cancel()
            await copy.drain()  # never leave a scatter into our cache running behind the caller
            abort_soon(ep, staging, resp_buf, abort_buf)
            if ok:
                pool.give(staging)
