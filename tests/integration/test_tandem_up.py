"""`tandem up` as a user runs it: starts everything, serves `tandem generate`, restarts a worker that
dies (saying so), and leaves no process behind on SIGTERM, or when the launcher itself is SIGKILLed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import openai
import pytest

from protos.tandem.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.launcher import free_ports
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.slow


def processes_mentioning(marker: str) -> list[int]:
    """PIDs whose command line contains `marker` (the run's unique cluster name or work dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def start_up(tmp_path, cluster: str) -> tuple[subprocess.Popen, str]:
    base = free_ports(1)[0]
    # a block of 9 ports from base must be free (4 gRPC, 4 metrics, the HTTP API); keep clear of the top
    base = min(base, 65000)
    cmd = [sys.executable, "-m", "tandem", "up", "--base-port", str(base), "--cluster", cluster, "--workdir", str(tmp_path),
           "--kv-cache-gb", "0.25", "--threads", "1"]  # fmt: skip
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: b"Tandem is up" in (tmp_path / "up.log").read_bytes() or proc.poll() is not None, "tandem up to report", timeout=180, interval=0.2)
    assert proc.poll() is None, (tmp_path / "up.log").read_text()
    return proc, f"127.0.0.1:{base}"


def service_pid(marker: str, role: str) -> int | None:
    """The PID of the `tandem serve ROLE` process whose command line holds `marker`."""
    for pid in processes_mentioning(marker):
        try:
            if f"serve\0{role}\0".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            pass
    return None


def generate(gateway: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem", "generate", "--chat", "What is the capital of France?", "--gateway", gateway,
                           "--max-tokens", "16", "--timeout", "60"], capture_output=True, text=True, timeout=90)  # fmt: skip


def decode_registrations_since(gateway: str, since_ms: int) -> list[str]:
    """The decode workers the gateway knows of (from etcd, connected or not) that started after
    `since_ms` (unix ms): a restarted process registers anew, with a later started_unix_ms."""
    with grpc.insecure_channel(gateway) as channel:
        reply = gateway_pb2_grpc.GatewayStub(channel).ListWorkers(gateway_pb2.ListWorkersRequest(), timeout=5)
    return [w.registration.worker_id for w in reply.workers if w.registration.role == "decode" and w.registration.started_unix_ms > since_ms]


def test_tandem_up_serves_generate_restarts_a_dead_worker_and_stops_everything_on_sigterm(tmp_path, default_model_dir):
    cluster = f"up-{uuid.uuid4().hex[:8]}"
    proc, gateway = start_up(tmp_path, cluster)
    try:
        children = processes_mentioning(cluster)
        assert len(children) >= 4, "tokenizer, prefill, decode and gateway run as processes"
        out = generate(gateway)
        assert out.returncode == 0, out.stderr
        assert "Paris" in out.stdout
        assert "finish_reason=" in out.stderr
        # the OpenAI API, at the base URL `tandem up` prints, with the official SDK
        log = (tmp_path / "up.log").read_text()
        base_url = re.search(r"OpenAI-compatible HTTP API at (http://\S+/v1)", log).group(1)
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as client:
            model = client.models.list().data[0].id
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0
            )
        assert "Paris" in reply.choices[0].message.content
        # supervision: a SIGKILLed decode worker is restarted, and `tandem up` says so with the count
        decode = service_pid(cluster, "decode")
        killed_ms = int(time.time() * 1000)
        os.kill(decode, signal.SIGKILL)
        wait_for(lambda: "decode-0 is SERVING again (restart 1" in (tmp_path / "up.log").read_text() or proc.poll() is not None,
                 "the decode worker to be restarted", timeout=120, interval=0.2)  # fmt: skip
        assert proc.poll() is None, (tmp_path / "up.log").read_text()
        assert "decode-0 killed by SIGKILL; restart 1 in 1.0s" in (tmp_path / "up.log").read_text()
        assert service_pid(cluster, "decode") not in (None, decode)
        # "SERVING again" is the launcher's own health check, after the new process put its key in
        # etcd; the gateway hears of the key a moment later (wait for that: a gateway that knows
        # of no decode worker at all fails at once, by design), and its Watch stream to the
        # worker is up later still (under load, most of a second). A request in that gap waits
        # for the registered worker (request_path.DECODE_CONNECT_WAIT_S): the FIRST one succeeds
        wait_for(lambda: decode_registrations_since(gateway, killed_ms), "the gateway to hear of the restarted decode worker", timeout=30)
        out = generate(gateway)
        assert out.returncode == 0 and "Paris" in out.stdout, out.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        shutdown = (tmp_path / "up.log").read_text().partition("stopping Tandem")[2]
        assert "restart" not in shutdown, f"nothing is restarted while stopping:\n{shutdown}"
        wait_for(
            lambda: not processes_mentioning(cluster) and not processes_mentioning(str(tmp_path / "etcd-data")), "no process of the cluster left", timeout=10
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in processes_mentioning(cluster):
            os.kill(pid, signal.SIGKILL)


def test_children_die_with_a_sigkilled_launcher(tmp_path, default_model_dir):
    cluster = f"up-{uuid.uuid4().hex[:8]}"
    proc, _ = start_up(tmp_path, cluster)
    try:
        assert processes_mentioning(cluster)
        proc.kill()
        proc.wait(timeout=10)
        wait_for(
            lambda: not processes_mentioning(cluster) and not processes_mentioning(str(tmp_path / "etcd-data")), "the orphaned services to exit", timeout=60
        )
    finally:
        for pid in processes_mentioning(cluster):
            os.kill(pid, signal.SIGKILL)
