"""A stand-in for a worker's Decode.Generate call in the gateway's unit tests (no server)."""

from __future__ import annotations

import grpc

from gateway.decode_mux import rpc_error as status_error
from protos.tandem.v1 import common_pb2


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return status_error(code, f"fake {code.name}")


class FakeDecodeCall:
    """Yields `tokens` one chunk each, the last one finished (with `final_usage`, if given), or
    fails with `fail` after them."""

    def __init__(self, tokens, fail: grpc.StatusCode | None, final_usage: common_pb2.Usage | None = None):
        self.tokens, self.fail, self.final_usage = tokens, fail, final_usage

    def cancel(self):
        pass

    async def __aiter__(self):
        for i, t in enumerate(self.tokens):
            chunk = common_pb2.GenerateResponse(token_ids=[t])
            if self.fail is None and i == len(self.tokens) - 1:
                chunk.finish_reason = common_pb2.FINISH_REASON_LENGTH
                if self.final_usage is not None:
                    chunk.usage.CopyFrom(self.final_usage)
            yield chunk
        if self.fail is not None:
            raise rpc_error(self.fail)
