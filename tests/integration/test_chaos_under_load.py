"""Workers SIGKILLed under a steady `tandem bench` load, in a cluster that `tandem up` would run
(supervised): the client sees no failed request, and the dead worker is restarted by the launcher
and back in routing within 15 s of its death. (etcd outages under load: test_resilience.py.)

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
RECOVERY_S = 15.0  # the goal: back in routing within 15 s of its death
POLICY = RestartPolicy(initial_backoff=1.0, max_backoff=4.0, stable_after=60.0, max_restarts=3)


@pytest.fixture(scope="module")
def chaos_cluster(tmp_path_factory, tiny_llama):
    role_args = {"gateway": ["--disagg-min-uncached-tokens", "16"]}
    with running_cluster(tmp_path_factory.mktemp("chaos"), model=str(tiny_llama), tokenizer=False, num_prefill=1, num_decode=2,
                         restart=True, restart_policy=POLICY, role_args=role_args) as c:  # fmt: skip
        wait_for(lambda: all(w.HasField("load") for w in {**routed_workers(c.gateway_address), **routed_workers(c.gateway_address, "prefill")}.values())
                 and len(routed_workers(c.gateway_address)) == 2, "every worker routed to", timeout=30)  # fmt: skip
        yield c


def kill_under_load(c, tmp_path, name: str, role: str, min_in_flight: int) -> tuple[dict, float]:
    """SIGKILL `name` once it has `min_in_flight` requests in flight under a 14 s load; returns
    the bench result and how long after its death the launcher had it back in routing."""
    victim = c.service(name)
    old_started = routed_workers(c.gateway_address, role)[name].registration.started_unix_ms
    # long outputs (~0.5 s a request here), so that streams are mid-way when the worker dies
    with BenchLoad(c.gateway_address, tmp_path / "bench", duration=14, rate=8, input_len=40, output_len=400, vocab_size=TINY_VOCAB) as load:
        wait_for(lambda: in_flight(c.gateway_address, role).get(name, 0) >= min_in_flight, f"the load to reach {name}", timeout=30, interval=0.01)
        victim.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: back_in_routing(c.gateway_address, c.etcd_endpoint, name, role, old_started),
                 f"{name} back in routing (its log: {victim.log_path})", timeout=RECOVERY_S + 15, interval=0.1)  # fmt: skip
        recovery = time.monotonic() - killed_at
        result = load.result()
    return result, recovery


@pytest.mark.parametrize(
    ("name", "role", "min_in_flight", "serving_again"),
    [("decode-1", "decode", 2, "the restarted decode-1 to serve requests"),
     ("prefill-0", "prefill", 1, "the restarted prefill-0 to prefill again")],  # prefill: under disaggregated load
    ids=["decode-worker", "prefill-worker"],
)  # fmt: skip
def test_sigkill_of_a_worker_under_load_fails_no_request(chaos_cluster, tmp_path, name, role, min_in_flight, serving_again):
    c = chaos_cluster
    result, recovery = kill_under_load(c, tmp_path, name, role, min_in_flight=min_in_flight)
    assert c.restarts(name) == 1
    assert result["completed"] > 20 and result["failed"] == 0, failures(result)
    assert recovery <= RECOVERY_S, f"{name} back in routing {recovery:.1f}s after its death"
    # and it serves again: its KV events (of requests it computed) reach the gateway's index
    with BenchLoad(c.gateway_address, tmp_path / "after", duration=4, rate=4, input_len=40, output_len=8, vocab_size=TINY_VOCAB) as load:
        after = load.result()
    assert after["failed"] == 0, failures(after)
    wait_for(lambda: routed_workers(c.gateway_address, role)[name].num_indexed_blocks > 0, serving_again, timeout=10)
