"""Supervision in LocalCluster (what `tandem up` runs): a worker that dies comes back with its id and
ports, registered and routed to, while the rest serves; a worker that cannot start is given up on
without taking the others down. (`tandem up`'s output and SIGTERM: test_tandem_up.py.)

One cluster of a tiny random Llama (fast to restart), two decode workers, round-robin routing;
the tests run in order on it.
"""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from benchmarks.cluster_probes import back_in_routing, registered_workers, routed_workers
from protos.tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tandem.health import check_health
from tandem.supervisor import RestartPolicy
from tests.helpers.waiting import wait_for
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.slow

POLICY = RestartPolicy(initial_backoff=0.5, max_backoff=1.0, stable_after=60.0, max_restarts=2)
BLOCK = 16  # the workers' default block size


@pytest.fixture(scope="module")
def supervised(tmp_path_factory, tiny_llama):
    with running_cluster(tmp_path_factory.mktemp("supervised"), model=str(tiny_llama), tokenizer=False, num_prefill=0, num_decode=2,
                         restart=True, restart_policy=POLICY, role_args={"gateway": ["--routing-policy", "round-robin"]}) as c:  # fmt: skip
        yield c


def ask(cluster, seed: int) -> None:
    """One request through the gateway; asserts it finished. Prompts of 2 full blocks, all distinct."""
    prompt = [3 + (seed * 7 + i * 13) % 380 for i in range(2 * BLOCK + 3)]
    request = gateway_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=prompt), sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    )
    with grpc.insecure_channel(cluster.gateway_address) as channel:
        chunks = list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=60))
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_a_sigkilled_decode_worker_is_restarted_and_routed_to_again(supervised):
    c = supervised
    wait_for(lambda: [w.HasField("load") for w in routed_workers(c.gateway_address).values()] == [True, True], "both decode workers routed to", timeout=30)
    victim = c.service("decode-1")
    old_pid, old_started = victim.proc.pid, routed_workers(c.gateway_address)["decode-1"].registration.started_unix_ms
    victim.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    # the rest keeps serving throughout, while decode-1 is down and coming back
    seed = 0
    while not back_in_routing(c.gateway_address, c.etcd_endpoint, "decode-1", "decode", old_started):
        assert time.monotonic() - killed_at < 30, f"decode-1 not back in 30s; its log ends:\n{victim.log_tail()}"
        ask(c, seed)
        seed += 1
    assert victim.proc.pid != old_pid and victim.port == c.service("decode-1").port
    assert check_health(victim.address) and c.restarts("decode-1") == 1 and c.restarts("decode-0") == 0
    wait_for(lambda: c.supervisor.status()["decode-1"] == {"restarts": 1, "state": "running"}, "the supervisor to see decode-1 SERVING", timeout=5)
    # the supervisor marks its events in the child's log just after it updates its status (same tick,
    # another thread than this one): wait for the lines rather than read once
    marks = ("decode-1 killed by SIGKILL; restart 1 in 0.5s", "decode-1 restarted (restart 1)", "decode-1 is SERVING again (restart 1")
    wait_for(lambda: all(m in victim.log_path.read_text() for m in marks), f"the supervisor's marks in {victim.log_path}", timeout=5)
    # round-robin: of a few distinct prompts, some land on the new decode-1 (its KV events reach the gateway)
    for i in range(4):
        ask(c, 1000 + i)
    wait_for(lambda: routed_workers(c.gateway_address)["decode-1"].num_indexed_blocks > 0, "the restarted decode-1 to serve a request", timeout=10)


def test_a_worker_that_exits_at_every_start_is_given_up_on_and_the_rest_serves(supervised):
    c = supervised
    victim, survivor = c.service("decode-0"), c.service("decode-1")
    survivor_pid, gateway_pid = survivor.proc.pid, c.service("gateway").proc.pid
    victim.args.append("--no-such-flag")  # every start from now on exits at once (argparse: exit 2)
    victim.proc.send_signal(signal.SIGKILL)
    killed_at, seed = time.monotonic(), 2000
    while not c.supervisor.gave_up("decode-0"):
        assert time.monotonic() - killed_at < 60, f"no give-up in 60s: {c.supervisor.status()}"
        ask(c, seed)  # requests keep being served by decode-1 meanwhile
        seed += 1
        time.sleep(0.2)
    assert c.restarts("decode-0") == POLICY.max_restarts
    assert "giving up on it after 2 restarts, the rest keeps running" in victim.log_path.read_text()
    assert victim.proc.poll() == 2
    assert c.supervisor.failed is None
    assert (survivor.proc.pid, c.service("gateway").proc.pid) == (survivor_pid, gateway_pid), "nothing else was restarted"
    wait_for(lambda: "decode-0" not in routed_workers(c.gateway_address), "the given-up worker to leave routing", timeout=15)
    assert "decode-0" not in registered_workers(c.etcd_endpoint)
    for i in range(3):
        ask(c, 3000 + i)
