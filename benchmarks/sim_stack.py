"""SimStack: etcd, a real gateway process and a simulated worker fleet process, on free loopback
ports — what the gateway benchmarks (and the bench-over-simulated-workers test) run against.

    with SimStack(workdir, num_decode=8, fleet_args=["--time-scale", "0.25"]) as stack:
        stack.set_policy("round-robin")          # live, through the etcd key
        stack.restart_fleet()                    # fresh, empty caches
        ... tandem bench --gateway stack.gateway ...

Every process is a child that gets SIGTERM if this one dies (tandem/processes.py); stop() ends
them in order (fleet, gateway, etcd) and is idempotent.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc

from gateway.scheduling.live_config import put_scheduling_document
from protos.tandem.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.etcd_process import EtcdProcess
from tandem.launcher import free_ports
from tandem.processes import popen_child, stop_child


def wait_for_workers(gateway: str, n: int, timeout: float = 120.0) -> None:
    """Until the gateway has load snapshots from `n` decode workers (their Watch streams are up)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(gateway) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        while time.monotonic() < deadline:
            try:
                reply = stub.ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=5)
                if sum(1 for w in reply.workers if w.registration.role == "decode" and w.HasField("load")) >= n:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"the gateway at {gateway} did not see {n} decode workers within {timeout:.0f}s")


class SimStack:
    def __init__(self, workdir: Path, num_decode: int, num_prefill: int = 0, fleet_args: list[str] = (), gateway_args: list[str] = (),
                 cluster: str = "sim-stack"):  # fmt: skip
        self.workdir = Path(workdir)
        self.cluster = cluster
        self.num_decode = num_decode
        etcd_port, peer_port, gateway_port = free_ports(3)
        self.etcd = EtcdProcess(self.workdir / "etcd", etcd_port, peer_port, self.workdir / "etcd.log")
        self.gateway = f"127.0.0.1:{gateway_port}"
        self._gateway_cmd = [sys.executable, "-m", "tandem", "serve", "gateway", "--etcd", self.etcd.endpoint, "--cluster", cluster,
                             "--port", str(gateway_port), "--metrics-port", "0", "--http-port", "0", "--lease-ttl", "3", "--log-level", "warning", *gateway_args]  # fmt: skip
        self._fleet_cmd = [sys.executable, "-m", "loadtest.sim.fleet", "--etcd", self.etcd.endpoint, "--cluster", cluster, "--decode", str(num_decode),
                           "--prefill", str(num_prefill), "--lease-ttl", "3", *fleet_args]  # fmt: skip
        self.gateway_proc: subprocess.Popen | None = None
        self.fleet_proc: subprocess.Popen | None = None
        self._num_fleets = 0

    def start(self) -> None:
        try:
            self.etcd.start()
            self.etcd.wait_healthy()
            self.gateway_proc = popen_child(self._gateway_cmd, self.workdir / "gateway.log")
            self.start_fleet()
        except BaseException:
            self.stop()
            raise

    def start_fleet(self) -> None:
        """Start the simulated fleet and wait until the gateway has every worker's load."""
        self._num_fleets += 1
        log = self.workdir / f"fleet-{self._num_fleets}.log"
        self.fleet_proc = subprocess.Popen(self._fleet_cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), stdin=subprocess.DEVNULL, text=True)
        line = self.fleet_proc.stdout.readline()  # "ready N workers" once all are registered
        if not line.startswith("ready"):
            raise RuntimeError(f"the simulated fleet did not start ({line!r}); its log {log} ends:\n{log.read_text()[-2000:]}")
        wait_for_workers(self.gateway, self.num_decode)

    def stop_fleet(self) -> None:
        if self.fleet_proc is not None:
            code = stop_child(self.fleet_proc, 30)
            self.fleet_proc = None
            if code != 0:
                raise RuntimeError(f"the simulated fleet exited with {code}; see {self.workdir}")

    def restart_fleet(self) -> None:
        """New workers with empty caches (the old ones revoke their leases and leave)."""
        self.stop_fleet()
        self.start_fleet()

    def set_policy(self, policy: str, settle_s: float = 1.0) -> None:
        asyncio.run(put_scheduling_document(self.etcd.endpoint, self.cluster, json.dumps({"policy": policy})))
        time.sleep(settle_s)  # every gateway applies it within milliseconds of the put

    def stop(self) -> None:
        try:
            self.stop_fleet()
        finally:
            if self.gateway_proc is not None:
                stop_child(self.gateway_proc, 30)
                self.gateway_proc = None
            self.etcd.stop()

    def __enter__(self) -> SimStack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
