"""Tandem across hosts: every service in its own network namespace (tests/helpers/netns.py).

etcd, the tokenizer, the gateway, a prefill and a decode worker each run on a "host" of their own
with its own address from 198.18.0.0/15, bind and advertise that address, and find each other by
name through the hosts' /etc/hosts; the test's client runs on a sixth host. Nothing is loopback:
gRPC, etcd and the KV transfer cross the bridge.

UCX across namespaces: the hosts share one kernel, boot id, PID and IPC namespace, so UCX takes
them for one node and picks its shared-memory lanes (posix/sysv), whose wake-up signal does not
cross network namespaces: with UCX's default transports every pull hangs until the transfer
timeout (measured: pulls with posix or sysv time out, cma and tcp work). The workers here run with
UCX_TLS=tcp,self, as the Kubernetes manifests do, and a test checks from UCX's own protocol report
that the KV travelled over TCP on eth0, as between real machines.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import pytest

from services.common.config import DEFAULT_GRPC_PORTS, DEFAULT_METRICS_PORTS
from tandem.etcd_process import find_etcd
from tandem.processes import popen_child, stop_child
from tests.helpers.netns import NetnsBed, unavailable_reason
from tests.helpers.netns_client import NetnsClient
from tests.helpers.waiting import wait_for

_UNAVAILABLE = unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"no multi-host test bed here: {_UNAVAILABLE}")]

ROLES = ("tokenizer", "prefill", "decode", "gateway")  # started in this order, stopped in reverse
HOSTS = ["etcd", *ROLES, "client"]
LEASE_TTL = 3
WORKER_ARGS = ["--threads", "1", "--kv-cache-gb", "0.25"]
ROLE_ARGS = {"prefill": ["--kv-lease-seconds", "5"], "decode": ["--kv-transfer-timeout", "5"], "gateway": ["--disagg-min-uncached-tokens", "0"]}
# the KV data plane as between machines (see the module docstring); UCX_PROTO_INFO makes UCX log
# the transport of every endpoint configuration it builds
UCX_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0", "UCX_PROTO_INFO": "y"}
PROMPT = "The history of the bicycle begins in the early nineteenth century, when inventors in Germany and France"


class BedCluster:
    def __init__(self, bed: NetnsBed, client: NetnsClient, logs):
        self.bed, self.client, self.logs = bed, client, logs

    def address(self, role: str) -> str:
        return f"{self.bed.address(role)}:{DEFAULT_GRPC_PORTS[role]}"

    def generate(self, mode: str, max_tokens: int = 12, text: str = PROMPT, timeout: float = 120) -> dict:
        return self.client.call("generate", address=self.address("gateway"), text=text, mode=mode, max_tokens=max_tokens, timeout=timeout)

    def generate_ids(self, token_ids: list[int], mode: str, max_tokens: int = 8) -> list[int]:
        answer = self.client.call("generate", address=self.address("gateway"), token_ids=token_ids, mode=mode, max_tokens=max_tokens, timeout=120)
        assert "tokens" in answer, f"{mode}: {answer}"
        return answer["tokens"]

    def metric(self, role: str, name: str, **labels: str) -> float:
        return self.client.call("metric", address=f"{self.bed.address(role)}:{DEFAULT_METRICS_PORTS[role]}", name=name, labels=labels, timeout=5)["value"]

    def assert_clean(self, *roles: str) -> None:
        """Each worker ends with no request and no KV block held, and CheckIntegrity clean."""
        for role in roles:
            idle = lambda: (lambda s: int(s.get("num_used_blocks", 0)) == 0 and int(s.get("num_requests_running", 0)) == 0)(
                self.client.call("load", address=self.address(role), timeout=5))  # fmt: skip
            wait_for(idle, f"{role} to hold no request and no KV block", timeout=15, interval=0.5)
            check = self.client.call("integrity", address=self.address(role), timeout=10)
            assert check.get("ok"), f"{role}: {check}"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, default_model_dir):
    logs = tmp_path_factory.mktemp("multi-host")
    procs: list[subprocess.Popen] = []
    with NetnsBed(HOSTS) as bed:
        client = None
        try:
            ip = bed.address("etcd")
            etcd = [find_etcd(), "--name", "etcd", "--data-dir", str(logs / "etcd-data"), "--log-level", "warn",
                    "--listen-client-urls", f"http://{ip}:2379", "--advertise-client-urls", f"http://{ip}:2379",
                    "--listen-peer-urls", f"http://{ip}:2380", "--initial-advertise-peer-urls", f"http://{ip}:2380",
                    "--initial-cluster", f"etcd=http://{ip}:2380"]  # fmt: skip
            procs.append(popen_child(bed.command("etcd", etcd), logs / "etcd.log"))
            for role in ROLES:
                args = [sys.executable, "-m", "tandem", "serve", role, "--host", bed.address(role), "--etcd", "etcd:2379",
                        "--lease-ttl", str(LEASE_TTL), "--worker-id", role, *ROLE_ARGS.get(role, [])]  # fmt: skip
                if role != "gateway":
                    args += ["--model", "default"]
                if role in ("prefill", "decode"):
                    args += WORKER_ARGS
                procs.append(popen_child(bed.command(role, args), logs / f"{role}.log", UCX_ENV if role in ("prefill", "decode") else {}))
            client = NetnsClient(bed, "client", logs / "client.log")
            cluster = BedCluster(bed, client, logs)
            for role in ROLES:
                wait_for(lambda: client.call("health", address=cluster.address(role), timeout=2).get("serving"),
                         f"{role} on {cluster.address(role)} to serve (log: {logs / (role + '.log')})", timeout=240, interval=1)  # fmt: skip
            yield cluster
        finally:
            if client is not None:
                client.close()
            for proc in reversed(procs):
                stop_child(proc, 10)


def ucx_report(cluster: BedCluster, role: str) -> list[str]:
    """UCX_PROTO_INFO's tables in a worker's log: a header row per endpoint configuration
    ("ucp_context_0 inter-node cfg#0 | tagged message by ...") and a row per message size range,
    whose last cell is the lane ("tcp/eth0")."""
    lines = (cluster.logs / f"{role}.log").read_text(errors="replace").splitlines()
    return [line for line in lines if line.startswith("[") and line.rstrip().endswith("|")]


def test_every_service_binds_and_advertises_its_hosts_address(hosts):
    registered = hosts.client.call("workers", address=hosts.address("gateway"))["workers"]
    assert sorted((w["role"], w["grpc_address"]) for w in registered) == sorted((role, hosts.address(role)) for role in ROLES), registered
    for role in ROLES:
        # local addresses of the listening sockets; gRPC's dual-stack socket shows [::ffff:IP]:PORT
        listening = {line.split()[3].replace("[::ffff:", "").replace("]", "") for line in hosts.bed.run(role, ["ss", "-Hltn"]).stdout.splitlines()}
        port = DEFAULT_GRPC_PORTS[role]
        assert hosts.address(role) in listening, f"{role} does not listen on {hosts.address(role)}: {listening}"
        assert not {f"0.0.0.0:{port}", f"*:{port}", f"[::]:{port}"} & listening, f"{role} binds every interface: {listening}"


def test_aggregated_and_disaggregated_answer_as_on_one_host(hosts, offline_llm):
    from services.engine.sampling_params import SamplingParams

    expected = offline_llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].token_ids
    for mode in ("aggregated", "disaggregated"):
        answer = hosts.generate(mode)
        assert answer.get("tokens") == expected, f"{mode} across hosts: {answer}, on one host: {expected}"
    hosts.assert_clean("prefill", "decode")


def test_kv_blocks_travel_over_tcp_between_hosts(hosts):
    hosts.generate("disaggregated", text=PROMPT + " and England")
    report = ucx_report(hosts, "decode") + ucx_report(hosts, "prefill")
    assert report, "UCX reported no endpoint configuration: was any KV pulled?"
    assert any("inter-node" in line for line in report), "\n".join(report[:20])
    assert not any("intra-node" in line for line in report), "UCX took the hosts for one node:\n" + "\n".join(report[:20])
    lanes = {line.rsplit("|", 2)[-2].strip() for line in report if line.count("|") >= 3 and "/" in line.rsplit("|", 2)[-2]}
    assert lanes and lanes <= {"tcp/eth0"}, f"KV must move over TCP on eth0, UCX used {lanes}"


def rejoin(hosts: BedCluster, role: str) -> None:
    """Heal `role`'s link and wait until requests are served again (its lease and the gateway's
    channel come back; gRPC's reconnect backoff can take a few seconds after the heal)."""
    hosts.bed.heal(role)
    wait_for(lambda: "tokens" in hosts.generate("aggregated", max_tokens=4, timeout=30), f"the {role} worker to rejoin", timeout=60, interval=1)


def test_partitioned_decode_worker_leaves_routing_and_rejoins(hosts):
    hosts.bed.partition("decode")
    try:
        # its lease expires (LEASE_TTL) and the gateway stops routing there: new requests fail
        # with UNAVAILABLE instead of hanging on a worker that cannot answer
        def refused() -> bool:
            answer = hosts.generate("aggregated", max_tokens=4, timeout=20)
            return answer.get("error") == "UNAVAILABLE"

        wait_for(refused, "requests to be refused while the only decode worker is cut off", timeout=LEASE_TTL + 30, interval=1)
        listed = hosts.client.call("workers", address=hosts.address("gateway"))["workers"]
        assert "decode" not in {w["role"] for w in listed}, f"the cut-off decode worker is still routed to: {listed}"
    finally:
        rejoin(hosts, "decode")
    assert "tokens" in hosts.generate("disaggregated", max_tokens=4)
    hosts.assert_clean("prefill", "decode")


def test_request_in_flight_to_a_cut_off_decode_worker_fails_before_its_deadline(hosts):
    deadline = 60.0
    hosts.bed.partition("decode")  # before the lease expires, the gateway still routes there
    try:
        t0 = time.monotonic()
        answer = hosts.generate("aggregated", max_tokens=4, timeout=deadline)
        elapsed = time.monotonic() - t0
    finally:
        rejoin(hosts, "decode")
    # the gateway's keepalive (default 10 s + 5 s) closes the silent connection; the call ends
    # UNAVAILABLE and, with no other decode worker to migrate to, the request fails cleanly
    # instead of hanging until the client's deadline (without keepalive: DEADLINE_EXCEEDED at 60 s)
    assert answer.get("error") == "UNAVAILABLE", answer
    assert elapsed < deadline / 2, f"the request took {elapsed:.0f}s of its {deadline:.0f}s deadline: {answer}"


def ids(n: int, start: int) -> list[int]:
    return [start + (i * 7919) % 30000 for i in range(n)]


def indexed_blocks(hosts: BedCluster, role: str) -> int:
    workers = hosts.client.call("workers", address=hosts.address("gateway"))["workers"]
    return sum(int(w.get("num_indexed_blocks", 0)) for w in workers if w["role"] == role)


def test_decode_pulls_only_the_blocks_it_lacks_over_the_network(hosts):
    shared = ids(16 * 4, start=5)
    hosts.generate_ids(shared + [11, 12, 13], "aggregated")  # the decode worker now caches the four shared blocks
    # its KV events crossed to the gateway's host: the prefix index knows those blocks
    wait_for(lambda: indexed_blocks(hosts, "decode") >= 4, "the gateway to index the decode worker's blocks", timeout=10, interval=0.2)
    before = hosts.metric("decode", "tandem_kv_pull_blocks_total")
    as_messages = hosts.metric("decode", "tandem_kv_pulls_total", path="messages")
    prompt = shared + ids(16 * 2 + 9, start=77)
    disaggregated = hosts.generate_ids(prompt, "disaggregated")
    assert hosts.metric("decode", "tandem_kv_pull_blocks_total") - before == 3, "two full blocks and the partial one"
    # another host (UCX_TLS=tcp,self): UCX messages over TCP, never a local read
    assert hosts.metric("decode", "tandem_kv_pulls_total", path="messages") - as_messages == 1
    assert hosts.metric("decode", "tandem_kv_pulls_total", path="local") == 0
    assert disaggregated == hosts.generate_ids(prompt, "aggregated")
    hosts.assert_clean("prefill", "decode")


def test_prefill_cut_off_during_a_pull_falls_back_to_recompute(hosts, offline_llm):
    from services.engine.sampling_params import SamplingParams

    prompt = ids(16 * 20, start=41)
    expected = offline_llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0].token_ids
    failures = hosts.metric("decode", "tandem_kv_pull_failures_total")
    workers = hosts.client.call("workers", address=hosts.address("gateway"))["workers"]
    decode_kv = next(w["kv_client_address"] for w in workers if w["role"] == "decode")  # the handle is bound to that worker
    first = hosts.client.call("prefill", address=hosts.address("prefill"), token_ids=prompt, request_id="cut-off", max_tokens=8, decode_kv_address=decode_kv)
    hosts.bed.partition("prefill")  # the KV handle names a host that no longer answers
    try:
        # bounded by the decode worker's transfer timeout, then the prompt is recomputed there
        rest = hosts.client.call("decode", address=hosts.address("decode"), token_ids=prompt, request_id="cut-off", max_tokens=8, timeout=60)
    finally:
        hosts.bed.heal("prefill")
    assert first["tokens"][:1] + rest.get("tokens", [])[:5] == expected, f"prefill {first}, decode {rest}"
    assert hosts.metric("decode", "tandem_kv_pull_failures_total") == failures + 1
    # the prefill worker kept its blocks pinned until the lease ran out, and it rejoins routing
    hosts.assert_clean("prefill", "decode")
    # (the gateway's channel to it may sit in gRPC's reconnect backoff for a few seconds after the heal)
    wait_for(lambda: "tokens" in hosts.generate("disaggregated", max_tokens=4, timeout=30), "the prefill worker to rejoin routing", timeout=60, interval=1)


def test_latency_and_loss_leave_answers_exact(hosts):
    answer = hosts.generate("aggregated", text=PROMPT + " and Italy")
    assert "tokens" in answer, answer
    expected = answer["tokens"]
    try:
        hosts.bed.netem("decode", "delay", "20ms", "5ms", "loss", "2%")
    except RuntimeError as e:
        pytest.skip(f"tc netem is not available in this kernel: {e}")
    try:
        hosts.bed.netem("prefill", "delay", "20ms", "5ms", "loss", "2%")
        for mode in ("aggregated", "disaggregated"):
            assert hosts.generate(mode, text=PROMPT + " and Italy").get("tokens") == expected, mode
    finally:
        for host in ("decode", "prefill"):
            with contextlib.suppress(RuntimeError):
                hosts.bed.netem(host)
    hosts.assert_clean("prefill", "decode")
