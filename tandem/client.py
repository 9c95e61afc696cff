"""A small client of the Gateway: what `tandem generate` uses, and a handy library call."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def build_request(prompt: str, chat: bool, max_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                  stop: list[str] | None = None, mode: str = "auto") -> gateway_pb2.GenerateRequest:  # fmt: skip
    sampling = common_pb2.SamplingParams(stop=stop or [])
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    serving_mode = gateway_pb2.ServingMode.Value("SERVING_MODE_" + mode.upper())
    if chat:
        messages = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=prompt)])
        return gateway_pb2.GenerateRequest(chat=messages, sampling=sampling, mode=serving_mode)
    return gateway_pb2.GenerateRequest(text=prompt, sampling=sampling, mode=serving_mode)


def stream_generate(address: str, request: gateway_pb2.GenerateRequest, timeout: float | None = None,
                    api_key: str | None = None, tls_ca: str | None = None) -> Iterator[common_pb2.GenerateResponse]:  # fmt: skip
    """Yield the gateway's chunks; raises grpc.RpcError with the server's status on failure.
    `api_key`: sent as `authorization: Bearer KEY` (for a gateway with api_keys set).
    `tls_ca`: a CA file: TLS to a gateway whose certificate it signed (None: plaintext)."""
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    if tls_ca:
        with open(tls_ca, "rb") as fh:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(fh.read()))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        yield from gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=timeout, metadata=metadata)


FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in common_pb2.FinishReason.items()}
