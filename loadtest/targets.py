"""What the load runner talks to: the gateway's public Generate, or one decode worker directly.

    GatewayTarget   tandem.v1.Gateway/Generate          token ids, text or chat; the whole path
    WorkerTarget    tandem.v1.Decode/Generate           token ids only; isolates one worker (no
                                                        gateway, tokenizer, routing or prefill hop)

Both stream GenerateResponse chunks, so the runner records them the same way. One grpc.aio channel
carries every stream (HTTP/2 multiplexes them); `describe()` asks what is behind the address, for
the result's record, and never fails the run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc

from .workloads.base import RequestSpec

SERVING_MODES = ("auto", "aggregated", "disaggregated")
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass(frozen=True)
class SamplingOptions:
    """The sampling every request of a run shares (max_tokens comes from the workload)."""

    temperature: float = 0.0  # greedy, as vLLM's benchmark sends by default
    top_p: float | None = None
    top_k: int | None = None
    ignore_eos: bool = True  # output lengths are what the workload asks for
    seed: int | None = None  # per-request seed = this + the request's index, when set

    def to_proto(self, max_tokens: int, index: int) -> common_pb2.SamplingParams:
        p = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=self.temperature, ignore_eos=self.ignore_eos)
        if self.top_p is not None:
            p.top_p = self.top_p
        if self.top_k is not None:
            p.top_k = self.top_k
        if self.seed is not None:
            p.seed = (self.seed + index) % (1 << 64)
        return p

    def to_json(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "ignore_eos": self.ignore_eos, "seed": self.seed}


class _ChannelTarget:
    """A gRPC target's channel: opened by `async with`, closed after the run."""

    def __init__(self, address: str, sampling: SamplingOptions, cache_salt: str, tls_ca: str | None = None):
        self.address = address
        self.sampling = sampling
        self.cache_salt = cache_salt  # may be changed between runs (bench_cli gives every run a fresh one)
        self.tls_ca = tls_ca  # a CA file: TLS to a front door whose certificate it signed (`tandem up --tls`)
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self):
        if self.tls_ca:
            with open(self.tls_ca, "rb") as f:
                credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
            self._channel = grpc.aio.secure_channel(self.address, credentials, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout: float) -> None:
        """Raise ConnectionError when nothing answers at the address within `timeout` seconds."""
        await wait_channel_ready(self._channel, self.address, timeout)


class GatewayTarget(_ChannelTarget):
    kind = "gateway"

    def __init__(
        self, address: str, sampling: SamplingOptions, serving_mode: str = "auto", cache_salt: str = "", api_key: str | None = None, tls_ca: str | None = None
    ):
        if serving_mode not in SERVING_MODES:
            raise ValueError(f"serving mode must be one of {', '.join(SERVING_MODES)}, got {serving_mode!r}")
        super().__init__(address, sampling, cache_salt, tls_ca)
        self.mode = gateway_pb2.ServingMode.Value("SERVING_MODE_" + serving_mode.upper())
        self.serving_mode = serving_mode
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None  # a gateway with api_keys set

    def build(self, spec: RequestSpec, request_id: str, index: int) -> gateway_pb2.GenerateRequest:
        req = gateway_pb2.GenerateRequest(
            request_id=request_id, sampling=self.sampling.to_proto(spec.max_tokens, index), cache_salt=self.cache_salt, mode=self.mode
        )
        if spec.token_ids is not None:
            req.token_ids.ids.extend(spec.token_ids)
        elif spec.text is not None:
            req.text = spec.text
        else:
            req.chat.messages.extend(common_pb2.ChatMessage(role=role, content=content) for role, content in spec.messages)
        return req

    def generate(self, spec: RequestSpec, request_id: str, index: int, timeout: float | None):
        """Start one stream; the call is async-iterable and cancellable."""
        return gateway_pb2_grpc.GatewayStub(self._channel).Generate(self.build(spec, request_id, index), timeout=timeout, metadata=self._metadata)

    async def describe(self) -> dict:
        """The model and workers behind the gateway (ListWorkers); empty fields when it cannot say."""
        info = {"kind": self.kind, "address": self.address, "serving_mode": self.serving_mode, "model_id": None, "workers": {}}
        try:
            reply = await gateway_pb2_grpc.GatewayStub(self._channel).ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=5, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            info["describe_error"] = f"{e.code().name}: {e.details()}"
            return info
        workers: dict[str, int] = {}
        for w in reply.workers:
            workers[w.registration.role] = workers.get(w.registration.role, 0) + 1
            if w.registration.role == "decode" and w.registration.model:
                info["model_id"] = w.registration.model
        info["workers"] = workers
        return info


class WorkerTarget(_ChannelTarget):
    kind = "worker"

    def __init__(self, address: str, sampling: SamplingOptions, cache_salt: str = ""):
        super().__init__(address, sampling, cache_salt)

    def build(self, spec: RequestSpec, request_id: str, index: int) -> worker_pb2.WorkerGenerateRequest:
        if spec.token_ids is None:
            raise ValueError("a worker takes token ids only (it has no tokenizer): use --prompt-format tokens, or target the gateway")
        return worker_pb2.WorkerGenerateRequest(
            request_id=request_id, prompt_token_ids=spec.token_ids, sampling=self.sampling.to_proto(spec.max_tokens, index), cache_salt=self.cache_salt
        )

    def generate(self, spec: RequestSpec, request_id: str, index: int, timeout: float | None):
        return worker_pb2_grpc.DecodeStub(self._channel).Generate(self.build(spec, request_id, index), timeout=timeout)

    async def describe(self) -> dict:
        info = {"kind": self.kind, "address": self.address, "model_id": None}
        try:
            load = await worker_pb2_grpc.WorkerStub(self._channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
            info["worker_id"] = load.worker_id
            info["num_kv_blocks"] = load.num_total_blocks
        except grpc.aio.AioRpcError as e:
            info["describe_error"] = f"{e.code().name}: {e.details()}"
        return info


async def wait_channel_ready(channel: grpc.aio.Channel, address: str, timeout: float) -> None:
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except TimeoutError:
        raise ConnectionError(f"nothing answers gRPC at {address} after {timeout:.0f}s (is `tandem up` running? it prints the gateway's address)") from None
