"""A gRPC client that runs inside a test-bed host (tests/helpers/netns.py) for a test outside it.

The test process cannot reach the bed's addresses, so it starts this module in a host namespace
and sends it one JSON request a line on stdin; each answer is one JSON line on stdout:

    client = NetnsClient(bed, "client", log_path)
    client.call("generate", address="198.18.0.3:50050", text="Hello", mode="disaggregated", max_tokens=8)
    client.call("health", address="198.18.0.4:50053")     # {"serving": true}
    client.close()

Operations: health, generate (text or token_ids), workers (Gateway.ListWorkers), load
(Worker.GetLoad), integrity (Worker.CheckIntegrity), metric (a sum over /metrics samples), and the
two legs of a disaggregated request called directly: prefill (bound to the decode worker whose
kv_client_address, hex as `workers` gives it, it names; keeps the KV handle under the request id)
and decode (uses it). A gRPC
error is an answer too: {"error": "UNAVAILABLE", "message": ...}.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path


def _serve() -> None:  # runs inside the namespace
    import urllib.request

    import grpc
    from google.protobuf import json_format
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from prometheus_client.parser import text_string_to_metric_families

    from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc

    modes = {"auto": gateway_pb2.SERVING_MODE_AUTO, "aggregated": gateway_pb2.SERVING_MODE_AGGREGATED,
             "disaggregated": gateway_pb2.SERVING_MODE_DISAGGREGATED}  # fmt: skip

    handles: dict[str, worker_pb2.PrefillResponse] = {}  # request id → the prefill leg's answer

    def sampling_of(req: dict) -> common_pb2.SamplingParams:
        return common_pb2.SamplingParams(max_tokens=req["max_tokens"], temperature=0, ignore_eos=True)

    def handle(req: dict) -> dict:
        timeout = req.get("timeout", 60)
        if req["op"] == "metric":
            with urllib.request.urlopen(f"http://{req['address']}/metrics", timeout=timeout) as r:
                text = r.read().decode()
            labels = req.get("labels", {}).items()
            return {
                "value": sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == req["name"] and labels <= s.labels.items())
            }
        with grpc.insecure_channel(req["address"]) as channel:
            if req["op"] == "health":
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
                    return {"serving": reply.status == health_pb2.HealthCheckResponse.SERVING}
                except grpc.RpcError:
                    return {"serving": False}
            if req["op"] == "generate":
                request = gateway_pb2.GenerateRequest(sampling=sampling_of(req), mode=modes[req["mode"]])
                if "token_ids" in req:
                    request.token_ids.ids.extend(req["token_ids"])
                else:
                    request.text = req["text"]
                chunks = list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=timeout))
                return {"tokens": [t for c in chunks for t in c.token_ids], "cached_tokens": chunks[-1].usage.cached_prompt_tokens if chunks else 0}
            if req["op"] == "workers":
                reply = gateway_pb2_grpc.GatewayStub(channel).ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=timeout)
                return {"workers": [{"role": w.registration.role, "grpc_address": w.registration.grpc_address,
                                     "num_indexed_blocks": w.num_indexed_blocks, "kv_client_address": w.registration.kv_client_address.hex()}
                                    for w in reply.workers]}  # fmt: skip
            if req["op"] == "prefill":
                request = worker_pb2.PrefillRequest(
                    request_id=req["request_id"],
                    prompt_token_ids=req["token_ids"],
                    sampling=sampling_of(req),
                    decode_kv_address=bytes.fromhex(req["decode_kv_address"]),
                )  # the handle is bound to it
                handles[req["request_id"]] = reply = worker_pb2_grpc.PrefillStub(channel).Prefill(request, timeout=timeout)
                return {"tokens": list(reply.first.token_ids)}
            if req["op"] == "decode":
                reply = handles.pop(req["request_id"])
                request = worker_pb2.WorkerGenerateRequest(
                    request_id=req["request_id"], prompt_token_ids=req["token_ids"], kv_handle=reply.kv_handle,
                    first_token_id=reply.first.token_ids[0], sampling=sampling_of(req),
                )  # fmt: skip
                chunks = list(worker_pb2_grpc.DecodeStub(channel).Generate(request, timeout=timeout))
                return {"tokens": [t for c in chunks for t in c.token_ids]}
            stub = worker_pb2_grpc.WorkerStub(channel)
            if req["op"] == "load":
                return json_format.MessageToDict(stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=timeout), preserving_proto_field_name=True)
            if req["op"] == "integrity":
                reply = stub.CheckIntegrity(worker_pb2.CheckIntegrityRequest(), timeout=timeout)
                return {"ok": reply.ok, "problem": reply.problem}
        return {"error": "INVALID_ARGUMENT", "message": f"unknown op {req['op']!r}"}

    for line in sys.stdin:
        try:
            answer = handle(json.loads(line))
        except grpc.RpcError as e:
            answer = {"error": e.code().name, "message": e.details()}
        print(json.dumps(answer), flush=True)


class NetnsClient:
    """The agent process in `host`; call() is one request and its answer, bounded by a timeout."""

    def __init__(self, bed, host: str, log_path: Path):
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            bed.command(host, [sys.executable, "-m", "tests.helpers.netns_client"]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip

    def call(self, op: str, timeout: float = 60, **fields) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, "timeout": timeout, **fields}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 10)
        assert ready, f"the in-namespace client gave no answer to {op} within {timeout + 10:.0f}s"
        line = self.proc.stdout.readline()
        assert line, f"the in-namespace client exited (code {self.proc.poll()}); see {self._log.name}"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


if __name__ == "__main__":
    _serve()
