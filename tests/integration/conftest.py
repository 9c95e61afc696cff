"""Integration fixtures: real etcd and every service as a real process, on free loopback ports.

The shared cluster (default model, one prefill and one decode worker) serves most tests; tests
that kill or stop things build their own. Every cluster is stopped at teardown, whatever happens.
"""

from __future__ import annotations

import contextlib

import grpc
import pytest

from tandem.etcd_process import EtcdProcess
from tandem.launcher import ClusterSpec, LocalCluster, free_ports
from tests.helpers.otlp_collector import InMemoryCollector

pytestmark = pytest.mark.slow

# one torch thread per worker: 2 cores are shared by every process of the cluster and the tests
WORKER_ARGS = ["--threads", "1", "--kv-cache-gb", "0.25"]


def make_cluster(tmp_path, **overrides) -> LocalCluster:
    spec = ClusterSpec(free_ports=True, lease_ttl=3, worker_args=list(WORKER_ARGS), workdir=tmp_path, **overrides)
    return LocalCluster(spec)


@contextlib.contextmanager
def running_cluster(tmp_path, timeout: float = 180, **overrides):
    """A started cluster, stopped on exit whatever happened."""
    c = make_cluster(tmp_path, **overrides)
    try:
        c.start(timeout=timeout)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def otlp_collector():
    collector = InMemoryCollector()
    collector.start()
    yield collector
    collector.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, otlp_collector, default_model_dir):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_collector.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with running_cluster(tmp_path_factory.mktemp("cluster"), env=env) as c:
        yield c


@pytest.fixture(scope="session")
def gateway_channel(cluster):
    with grpc.insecure_channel(cluster.gateway_address) as channel:
        yield channel


@pytest.fixture(scope="session")
def offline_llm(default_model_dir):
    """The offline engine on the same model: the reference the services must match."""
    from services.engine import LLM

    return LLM(model="default", num_threads=1, kv_cache_memory_gb=0.25)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    """A real etcd on free ports, shared by one test module (tests use distinct cluster names)."""
    client_port, peer_port = free_ports(2)
    proc = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data", client_port, peer_port)
    proc.start()
    try:
        proc.wait_healthy()
        yield proc.endpoint
    finally:
        proc.stop()
