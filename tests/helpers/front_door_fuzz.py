"""Generated bad requests for both front doors of a running gateway, and what became of each.

    http_case(rng)   → (path, body bytes): random JSON, valid bodies with one field broken (wrong
                       type, extreme number, invalid Unicode, oversized), garbage bytes, deep nesting
    grpc_case(rng)   → GenerateRequest bytes (real proto, random field values) or raw garbage bytes,
                       sent as they are with a raw channel method
    FrontDoorFuzz.run(n) sends n of them (half each door, `concurrency` at once) and counts the
                       outcomes: HTTP statuses, gRPC codes, `hang` (no answer before the timeout)

A request that happens to be valid asks for at most 2 tokens, so a run stays cheap. An outcome is
bad when it is an HTTP 500 (or a streamed error event of code internal/unknown), a gRPC UNKNOWN
or INTERNAL, or a hang. Used by tests/integration/test_fuzz_front_doors.py and
benchmarks/fuzz_front_doors.py.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
from dataclasses import dataclass, field

import aiohttp
import grpc

from protos.tandem.v1 import common_pb2, gateway_pb2

PATHS = ("/v1/completions", "/v1/chat/completions")
BAD_GRPC = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

EXTREME_NUMBERS = [0, -1, 1, 2, -0.0, 1e-30, 1e-5, 1e30, 1e300, -1e300, 2**31, 2**32, 2**63, 2**64, 10**30, -(2**63), 0.5, 1.0000001, 3.4e38]
JUNK_VALUES = [None, True, False, "", "x", "7", [], {}, [1], {"a": 1}, [[[]]], "\u0000", "🚀", -1, 1.5]
FIELDS = ["temperature", "top_p", "top_k", "seed", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "stop", "stop_token_ids",
          "n", "best_of", "presence_penalty", "frequency_penalty", "min_p", "ignore_eos", "stream", "stream_options", "cache_salt", "model",
          "prompt", "messages", "skip_special_tokens", "include_stop_str_in_output", "return_token_ids", "logit_bias", "echo"]  # fmt: skip


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 4 else 4)
    if kind == 0:
        return rng.choice(EXTREME_NUMBERS)
    if kind == 1:
        return rng.choice(JUNK_VALUES)
    if kind == 2:
        return "".join(
            chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FFF), rng.randrange(0x1F300, 0x1F600)])) for _ in range(rng.randrange(12))
        )
    if kind == 3:
        return rng.randrange(-(2**70), 2**70)
    if kind == 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FIELDS): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _base(path: str) -> dict:
    body: dict = {"max_tokens": 1, "temperature": 0}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "Say hi."}]
    else:
        body["prompt"] = "Say hi."
    return body


def _broken_body(rng: random.Random, path: str) -> bytes:
    """A valid body with one or two fields set to something odd, JSON-encoded (sometimes with raw
    escapes json.dumps would not write: lone surrogates, NaN, 1e400)."""
    body = _base(path)
    for _ in range(rng.randrange(1, 3)):
        name = rng.choice(FIELDS)
        value = rng.choice([rng.choice(EXTREME_NUMBERS), rng.choice(JUNK_VALUES), _random_json(rng)])
        if name in ("max_tokens", "max_completion_tokens") and isinstance(value, (int, float)) and not isinstance(value, bool) and 2 < value:
            value = -value or -1  # a valid big max_tokens would generate for minutes
        body[name] = value
    text = json.dumps(body, allow_nan=True)
    trick = rng.randrange(8)
    if trick == 0:
        text = text.replace('"Say hi."', '"Say \\ud800 hi."')
    elif trick == 1:
        text = text.replace('"temperature": 0', '"temperature": NaN' if rng.random() < 0.5 else '"temperature": 1e400')
    elif trick == 2:
        text = text.replace('"max_tokens": 1', '"max_tokens": ' + "9" * rng.choice([20, 400, 5000]))
    return text.encode()


def http_case(rng: random.Random) -> tuple[str, bytes]:
    path = rng.choice(PATHS)
    kind = rng.randrange(10)
    if kind <= 3:
        return path, _broken_body(rng, path)
    if kind == 4:
        return path, json.dumps(_random_json(rng)).encode()
    if kind == 5:
        return path, bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if kind == 6:
        depth = rng.choice([40, 1000, 100_000])
        return path, b'{"prompt":' + b"[" * depth + b"]" * depth + b"}"
    if kind == 7:  # huge fields, within the body limit
        body = _base(path)
        body[rng.choice(["stop", "cache_salt", "model", "stop_token_ids"])] = rng.choice([["s"] * 5000, "s" * 300_000, list(range(100_000))])
        return path, json.dumps(body).encode()
    if kind == 8:  # invalid UTF-8 inside an otherwise fine body
        return path, json.dumps(_base(path)).encode().replace(b"Say", b"S\xc3\x28y")
    body = _base(path)  # many chat messages or an over-long prompt (refused before tokenizing)
    if "messages" in body:
        body["messages"] = body["messages"] * rng.choice([2000, 20_000])
    else:
        body["prompt"] = "hi " * rng.choice([400_000, 1_000_000])
    return path, json.dumps(body).encode()


def _random_sampling(rng: random.Random) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(max_tokens=rng.choice([0, 1, 2, 2**32 - 1]))
    if rng.random() < 0.6:
        p.temperature = rng.choice([0.0, -1.0, 1e-30, 1e-7, 1e-5, 0.7, 100.0, 1e30, float("nan"), float("inf"), -float("inf"), 3.4e38])
    if rng.random() < 0.4:
        p.top_p = rng.choice([0.0, 1e-30, 0.5, 1.0, 1.5, float("nan"), -1.0])
    if rng.random() < 0.4:
        p.top_k = rng.choice([-(2**31), -2, -1, 0, 1, 5, 2**31 - 1])
    if rng.random() < 0.3:
        p.seed = rng.randrange(2**64)
    if rng.random() < 0.3:
        p.logprobs = rng.choice([0, 5, 20, 21, 2**32 - 1])
    if rng.random() < 0.2:
        p.stop.extend(rng.choice([[""], ["x"] * 100, ["s" * 5000], ["\n", "🚀"]]))
    if rng.random() < 0.2:
        p.stop_token_ids.extend(rng.choice([[0], [2**32 - 1], list(range(3000))]))
    return p


def grpc_case(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    req = gateway_pb2.GenerateRequest(sampling=_random_sampling(rng), mode=rng.choice([0, 1, 2]))
    prompt = rng.randrange(4)
    if prompt == 0:
        req.text = rng.choice(["", "Say hi.", "x" * 1_100_000, "\u0000\ufffd🚀"])
    elif prompt == 1:
        req.token_ids.ids.extend(rng.choice([[], [1, 2, 3], [2**32 - 1], [42] * 9000]))
    elif prompt == 2:
        n = rng.choice([0, 1, 3, 2000])
        req.chat.messages.extend(common_pb2.ChatMessage(role=rng.choice(["user", "robot", ""]), content="hi") for _ in range(n))
    if rng.random() < 0.2:
        req.cache_salt = "s" * rng.choice([10, 5000])
    if rng.random() < 0.2:
        req.request_id = rng.choice(["r\n", "r" * 300, "ok-id"])
    if rng.random() < 0.1:
        req.model = rng.choice(["nope", "m" * 5000])
    data = req.SerializeToString()
    if kind == 1 and data:  # flip or cut bytes of a real message
        i = rng.randrange(len(data))
        data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1 : i + 1 + rng.randrange(len(data))]
    return data


@dataclass
class FuzzResult:
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (outcome, the input, shortened)

    @property
    def num_bad(self) -> int:
        return len(self.bad)


def _short(data: bytes) -> str:
    return repr(data[:200]) + (f"... ({len(data)} bytes)" if len(data) > 200 else "")


class FrontDoorFuzz:
    def __init__(self, http_url: str, grpc_address: str, seed: int = 0, concurrency: int = 8, timeout: float = 120.0):
        self.http_url, self.grpc_address = http_url.removesuffix("/v1"), grpc_address
        self.rng = random.Random(seed)
        self.concurrency, self.timeout = concurrency, timeout
        self.result = FuzzResult()

    def _record(self, outcome: str, bad: bool, data: bytes) -> None:
        self.result.outcomes[outcome] += 1
        if bad:
            self.result.bad.append((outcome, _short(data)))

    async def _http(self, session: aiohttp.ClientSession, path: str, body: bytes) -> None:
        try:
            async with session.post(self.http_url + path, data=body, headers={"Content-Type": "application/json"}) as r:
                text = await r.text(errors="replace")
                status = r.status
        except TimeoutError:
            return self._record("http hang", True, body)
        # a streamed body is 200 with its error (if any) as an event
        streamed_internal = (
            status == 200 and '"error"' in text and any(f'"code":"{c}"' in text.replace(" ", "") for c in ("internal_error", "internal", "unknown"))
        )
        self._record(f"http {status}", status >= 500 or streamed_internal, body)

    async def _grpc(self, channel: grpc.aio.Channel, data: bytes) -> None:
        call = channel.unary_stream("/tandem.v1.Gateway/Generate", request_serializer=None, response_deserializer=None)
        try:
            async for _ in call(data, timeout=self.timeout):
                pass
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            code = e.code()
        hang = code == grpc.StatusCode.DEADLINE_EXCEEDED
        self._record("grpc hang" if hang else f"grpc {code.name}", hang or code in BAD_GRPC, data)

    async def run(self, n: int) -> FuzzResult:
        """Send n generated requests (alternating doors); returns the counts. Inputs are generated
        up front from the seed, so a run is reproducible."""
        cases = [("http", *http_case(self.rng)) if i % 2 == 0 else ("grpc", "", grpc_case(self.rng)) for i in range(n)]
        queue: asyncio.Queue = asyncio.Queue()
        for case in cases:
            queue.put_nowait(case)
        client_timeout = aiohttp.ClientTimeout(total=self.timeout)
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        async with aiohttp.ClientSession(timeout=client_timeout) as session, grpc.aio.insecure_channel(self.grpc_address, options=options) as channel:

            async def worker():
                while not queue.empty():
                    door, path, data = queue.get_nowait()
                    if door == "http":
                        await self._http(session, path, data)
                    else:
                        await self._grpc(channel, data)

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return self.result
