"""The prefill leg of a disaggregated request: the prompt's KV and first token from a prefill worker.

    decode worker without kv_client_address  → AUTO: serve aggregated; DISAGGREGATED: FAILED_PRECONDITION
    Prefill.Prefill on the decided worker    → its first token and a KV handle bound to the decode
                                               worker chosen (only it can pull the blocks)
    the prefill worker fails with a status another worker would not repeat (RETRYABLE_CODES)
                                             → AUTO: serve aggregated (the client has seen nothing
                                               yet); DISAGGREGATED: fail with that status
    any other status                         → the request fails with it

Afterwards the blocks are the decode worker's to pull; `release_later` frees them on the prefill
worker when the request ended without that (cancelled, failed, recomputed), not at the lease's
expiry. Every call's outcome feeds the pool's outlier detector.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from protos.tandem.v1 import worker_pb2
from services.common.errors import RequestError

from .decode_leg import RETRYABLE_CODES
from .pd_decider import uncached_tokens
from .routing_step import Route

log = logging.getLogger(__name__)


class PrefillLeg:
    """Runs prefill calls and the KV releases that follow them (background tasks, held until done)."""

    def __init__(self, pool, metrics):
        self.pool, self.metrics = pool, metrics
        self._tasks: set[asyncio.Task] = set()

    async def prefill(self, worker_request: worker_pb2.WorkerGenerateRequest, remaining: Callable[[], float | None], route: Route,
                      forced: bool) -> worker_pb2.PrefillResponse | None:  # fmt: skip
        """The prefill worker's reply (first token, KV handle unless the first token ended the
        request), or None: serve the request aggregated on `route.decode`. `forced`: the client
        asked for DISAGGREGATED, so there is no falling back. Raises RequestError."""
        decode, handle = route.decode, route.decision.prefill
        if not decode.registration.kv_client_address:  # a decode worker from before token binding: it cannot be handed KV
            if forced:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"decode worker {decode.worker_id} does not advertise kv_client_address "
                                   "(a version without KV token binding), so it cannot take a prefill worker's KV; upgrade it or use mode AUTO")  # fmt: skip
            return None
        self.metrics.decisions.labels(handle.worker_id, "prefill").inc()
        prefill_request = worker_pb2.PrefillRequest(
            request_id=worker_request.request_id,
            prompt_token_ids=worker_request.prompt_token_ids,
            sampling=worker_request.sampling,
            cache_salt=worker_request.cache_salt,
            # the transfer token is bound to the decode worker chosen above: only it can pull the KV
            # (if the decode leg moves the request, the new worker recomputes the prompt)
            decode_worker_id=decode.worker_id,
            decode_kv_address=decode.registration.kv_client_address,
        )
        with handle.in_flight(uncached_tokens(route.ctx, self.pool.index, handle)):
            try:
                reply = await handle.prefill_stub().Prefill(prefill_request, timeout=remaining())
            except grpc.aio.AioRpcError as e:
                self.pool.record_outcome(handle, e.code())
                if e.code() not in RETRYABLE_CODES or forced:
                    raise RequestError(e.code(), e.details() or e.code().name) from None
                log.warning("prefill worker %s failed (%s: %s); serving %s aggregated", handle.worker_id, e.code().name, e.details(), worker_request.request_id)
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    handle.mark_unreachable()
                self.metrics.worker_retries.labels("prefill", "fallback-aggregated").inc()
                return None
        self.pool.record_outcome(handle, grpc.StatusCode.OK)
        return reply

    def release_later(self, handle, kv_handle) -> None:
        """Free the blocks `kv_handle` pins on the prefill worker `handle`, in the background (the
        request's stream must not wait on it). Normally the decode worker's pull has released them
        already and this is a no-op there."""
        task = asyncio.create_task(self._release_kv(handle, kv_handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Wait for the releases still running (each has its own 5 s timeout)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _release_kv(self, handle, kv_handle) -> None:
        try:
            await handle.prefill_stub().ReleaseKV(
                worker_pb2.ReleaseKVRequest(request_id=kv_handle.request_id, transfer_token=kv_handle.transfer_token), timeout=5
            )
        except Exception as e:  # noqa: BLE001 - the handle expires on its own; nothing leaks
            log.info("could not release the KV of %s on %s: %s", kv_handle.request_id, handle.worker_id, e)
