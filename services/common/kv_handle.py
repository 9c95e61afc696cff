"""The KV handle on both sides, shared by real and simulated workers so they speak it identically:

prefill_request_problem()  what a prefill worker checks first: the request names the decode
                     worker the KV is for (the handle is bound to its UCX client address)
prefill_reply()      a prefill worker's answer: the first token, and (unless that token ended
                     the request) a handle to the pinned prompt blocks under a fresh lease,
                     bound to the decode worker the request names
kv_handle_problem()  what a decode worker checks before it pulls a block: the layouts match
                     (equal fingerprints mean the blocks mean the same thing), the prefill
                     worker's first token is there, and the handle covers exactly the prompt
"""

from __future__ import annotations

import grpc

from protos.tandem.v1 import common_pb2, worker_pb2

MAX_DECODE_KV_ADDRESS_BYTES = 0xFFFF  # a UCX pull request carries the client address with a u16 length


def prefill_request_problem(request: worker_pb2.PrefillRequest) -> str | None:
    """Why a prefill worker must refuse `request` with INVALID_ARGUMENT, else None. Every handle is
    bound to one decode worker, so a request that names none is refused: no unbound grant exists."""
    n = len(request.decode_kv_address)
    if n == 0:
        return ("decode_kv_address is required: the KV handle is bound to the decode worker that will pull it; set it (and "
                "decode_worker_id) from that worker's WorkerRegistration.kv_client_address")  # fmt: skip
    if n > MAX_DECODE_KV_ADDRESS_BYTES:
        return (
            f"decode_kv_address is {n} bytes, more than a UCX worker address can be ({MAX_DECODE_KV_ADDRESS_BYTES}); pass the decode worker's kv_client_address"
        )
    return None


def prefill_reply(first: common_pb2.GenerateResponse, num_cached_tokens: int, request_id: str, pinned, grant_lease, worker_id: str,
                  ucx_address: bytes, layout_fingerprint: str, *, bound_to: worker_pb2.PrefillRequest) -> worker_pb2.PrefillResponse:  # fmt: skip
    """The PrefillResponse for a prefilled prompt. `pinned` (block_ids, block_hashes, num_tokens)
    is None when the first token ended the request; otherwise `grant_lease(pinned, decode address)`
    gives the lease (expires_at, token) that owns the blocks from here, for the decode worker that
    `bound_to` (the PrefillRequest) names. The reply's first chunk carries no usage
    then: the decode worker reports the request's usage at its end."""
    reply = worker_pb2.PrefillResponse(first=first, num_cached_tokens=num_cached_tokens)
    if pinned is None:
        return reply
    reply.first.ClearField("usage")
    lease = grant_lease(pinned, bound_to.decode_kv_address)
    reply.kv_handle.CopyFrom(
        common_pb2.KVHandle(
            prefill_worker_id=worker_id, ucx_address=ucx_address, request_id=request_id, block_ids=pinned.block_ids,
            block_hashes=pinned.block_hashes, num_tokens=pinned.num_tokens, layout_fingerprint=layout_fingerprint,
            expires_unix_ms=int(lease.expires_at * 1000), transfer_token=lease.token,
            decode_worker_id=bound_to.decode_worker_id, decode_kv_address=bound_to.decode_kv_address,
        )
    )  # fmt: skip
    return reply


def kv_handle_problem(request: worker_pb2.WorkerGenerateRequest, mine: common_pb2.KVLayout) -> tuple[grpc.StatusCode, str] | None:
    """(status code, message) for a request this decode worker must refuse, else None."""
    handle = request.kv_handle
    if handle.layout_fingerprint != mine.fingerprint:
        return grpc.StatusCode.FAILED_PRECONDITION, (
            f"KV layout mismatch: prefill worker {handle.prefill_worker_id} has layout {handle.layout_fingerprint}, this decode worker "
            f"has {mine.fingerprint} (model {mine.model_id}, {mine.dtype}, {mine.num_layers} layers, {mine.num_kv_heads} KV heads, "
            f"head dim {mine.head_dim}, block size {mine.block_size}); pair workers that serve the same model the same way"
        )
    if not request.HasField("first_token_id"):
        return grpc.StatusCode.INVALID_ARGUMENT, "first_token_id is required with kv_handle (the token the prefill worker sampled)"
    if handle.num_tokens != len(request.prompt_token_ids):
        return grpc.StatusCode.INVALID_ARGUMENT, f"kv_handle covers {handle.num_tokens} tokens but the prompt has {len(request.prompt_token_ids)}"
    return None
