"""What a decode worker checks of a request that arrives with a KV handle, before it pulls a block:
the layouts match (equal fingerprints mean the blocks mean the same thing), the prefill worker's
first token is there, and the handle covers exactly the prompt. Real and simulated decode workers
refuse the same requests with the same status codes and messages."""

from __future__ import annotations

import grpc

from protos.tandem.v1 import common_pb2, worker_pb2


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
