"""Workers SIGKILLed under a steady `tandem bench` load, in a cluster that `tandem up` would run
(supervised): the client sees no failed request, and the dead worker is restarted by the launcher
and back in routing. (etcd outages under load: test_resilience.py.)

The goal is back in routing within 15 s of its death. Of that time Tandem's supervision and routing
own two parts, the wait before the restart (its backoff) and the lag from the new process's
registration to the gateway routing to it, and each is held to its own bound here. The third part,
the new process's start-up, is mostly importing torch (about 2 s of a free core, 4-5 s in all
with the engine and UCX); here six processes under a load that saturates both cores share the
machine and the same start-up took 5-11 s, so it is held only to a bound that catches start-up
doing work it should not (a kernel build at restart takes a minute).

One cluster of a tiny random Llama (fast restarts): a prefill worker and two decode workers, every
prompt disaggregated (--disagg-min-uncached-tokens 16), so a fault lands on requests in every leg:
queued, prefilling, pulling KV, mid-stream.
  - a decode worker dies: requests before the first token are retried elsewhere, streams that had
    begun are migrated to the other decode worker (the gateway resumes them there);
  - the prefill worker dies: requests fall back to aggregated serving (the decode worker prefills).
"""

from __future__ import annotations

import signal
import time

import pytest

from benchmarks.bench_load import BenchLoad, failures
from benchmarks.cluster_probes import back_in_routing, in_flight, routed_workers
from tandem.supervisor import RestartPolicy
from tests.helpers.waiting import wait_for
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.slow

TINY_VOCAB = 384  # tests/helpers/tiny_models.py
POLICY = RestartPolicy(initial_backoff=1.0, max_backoff=4.0, stable_after=60.0, max_restarts=3)
# Each part's bound, and what it measured in runs on two saturated cores:
RESTART_DELAY_S = POLICY.initial_backoff + 1.5  # the backoff, the supervisor's 0.2 s tick, a busy thread; 1.1-1.2 s
# registered in etcd → the gateway's etcd watch sees it and the worker's Watch stream answers: 0.0-0.2 s
# (0.1-3.0 s before the gateway's worker channels kept their own subchannel pools, worker_pool.py);
# discovery that waited for a resync or for the old lease to expire would take 10 s or more
ROUTING_LAG_S = 6.0
STARTUP_LIMIT_S = 30.0  # spawn → registered (see the module's docstring): 5.0-11.0 s


@pytest.fixture(scope="module")
def chaos_cluster(tmp_path_factory, tiny_llama):
    role_args = {"gateway": ["--disagg-min-uncached-tokens", "16"]}
    with running_cluster(tmp_path_factory.mktemp("chaos"), model=str(tiny_llama), tokenizer=False, num_prefill=1, num_decode=2,
                         restart=True, restart_policy=POLICY, role_args=role_args) as c:  # fmt: skip
        wait_for(lambda: all(w.HasField("load") for w in {**routed_workers(c.gateway_address), **routed_workers(c.gateway_address, "prefill")}.values())
                 and len(routed_workers(c.gateway_address)) == 2, "every worker routed to", timeout=30)  # fmt: skip
        yield c


def kill_under_load(c, tmp_path, name: str, role: str, min_in_flight: int) -> tuple[dict, dict[str, float]]:
    """SIGKILL `name` once it has `min_in_flight` requests in flight under a 14 s load; returns
    the bench result and the recovery's parts, in seconds: death → the new process spawned
    (`restart_delay`) → registered (`startup`) → routed to by the gateway (`routing_lag`)."""
    victim = c.service(name)
    old_started = routed_workers(c.gateway_address, role)[name].registration.started_unix_ms
    # long outputs (~0.5 s a request here), so that streams are mid-way when the worker dies
    with BenchLoad(c.gateway_address, tmp_path / "bench", duration=14, rate=8, input_len=40, output_len=400, vocab_size=TINY_VOCAB) as load:
        wait_for(lambda: in_flight(c.gateway_address, role).get(name, 0) >= min_in_flight, f"the load to reach {name}", timeout=30, interval=0.01)
        victim.proc.send_signal(signal.SIGKILL)
        killed_at = time.time()
        wait_for(lambda: back_in_routing(c.gateway_address, c.etcd_endpoint, name, role, old_started),
                 f"{name} back in routing (its log: {victim.log_path})", timeout=STARTUP_LIMIT_S + 15, interval=0.1)  # fmt: skip
        routed_at = time.time()
        registered_at = routed_workers(c.gateway_address, role)[name].registration.started_unix_ms / 1000
        result = load.result()
    spawned_at = victim.started_unix  # start() of the restart set it (the same ServiceProcess)
    parts = {"restart_delay": spawned_at - killed_at, "startup": registered_at - spawned_at, "routing_lag": routed_at - registered_at}
    return result, parts | {"recovery": routed_at - killed_at}


@pytest.mark.parametrize(
    ("name", "role", "min_in_flight", "serving_again"),
    [("decode-1", "decode", 2, "the restarted decode-1 to serve requests"),
     ("prefill-0", "prefill", 1, "the restarted prefill-0 to prefill again")],  # prefill: under disaggregated load
    ids=["decode-worker", "prefill-worker"],
)  # fmt: skip
def test_sigkill_of_a_worker_under_load_fails_no_request(chaos_cluster, tmp_path, name, role, min_in_flight, serving_again):
    c = chaos_cluster
    result, took = kill_under_load(c, tmp_path, name, role, min_in_flight=min_in_flight)
    assert c.restarts(name) == 1
    assert result["completed"] > 20 and result["failed"] == 0, failures(result)
    recovery = ", ".join(f"{k} {v:.1f}s" for k, v in took.items())
    print(f"{name}: {recovery}")  # shown with pytest -rP
    assert 0 < took["restart_delay"] <= RESTART_DELAY_S, f"{name} restarted late: {recovery}"
    assert 0 < took["startup"] <= STARTUP_LIMIT_S, f"{name} slow to start: {recovery} (its log: {c.service(name).log_path})"
    assert -0.5 < took["routing_lag"] <= ROUTING_LAG_S, f"{name} registered but routed to late: {recovery}"
    # and it serves again: its KV events (of requests it computed) reach the gateway's index
    with BenchLoad(c.gateway_address, tmp_path / "after", duration=4, rate=4, input_len=40, output_len=8, vocab_size=TINY_VOCAB) as load:
        after = load.result()
    assert after["failed"] == 0, failures(after)
    wait_for(lambda: routed_workers(c.gateway_address, role)[name].num_indexed_blocks > 0, serving_again, timeout=10)
