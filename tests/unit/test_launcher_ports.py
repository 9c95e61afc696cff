"""LocalCluster's port plan: the roles' default ports, shifted by base_port, or free ports."""

from __future__ import annotations

import pytest

from services.common.config import DEFAULT_GRPC_PORTS, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORTS
from tandem.launcher import ClusterSpec, LocalCluster


@pytest.fixture(autouse=True)
def etcd_ports_free(monkeypatch):
    """The plan takes 2379/2380 only when free (a system etcd may hold them); here they are."""
    import tandem.launcher

    monkeypatch.setattr(tandem.launcher, "port_or_free", lambda port: port)


def plan(tmp_path, **kw):
    return LocalCluster(ClusterSpec(workdir=tmp_path, **kw))._port_plan()


def test_default_spec_uses_the_roles_default_ports(tmp_path):
    ports = plan(tmp_path)
    assert ports == {
        "etcd": 2379,
        "etcd-peer": 2380,
        "gateway": DEFAULT_GRPC_PORTS["gateway"],
        "gateway/metrics": DEFAULT_METRICS_PORTS["gateway"],
        "tokenizer": DEFAULT_GRPC_PORTS["tokenizer"],
        "tokenizer/metrics": DEFAULT_METRICS_PORTS["tokenizer"],
        "prefill-0": DEFAULT_GRPC_PORTS["prefill"],
        "prefill-0/metrics": DEFAULT_METRICS_PORTS["prefill"],
        "decode-0": DEFAULT_GRPC_PORTS["decode"],
        "decode-0/metrics": DEFAULT_METRICS_PORTS["decode"],
        "gateway/http": DEFAULT_HTTP_PORT,
    }


def test_cluster_addresses_follow_the_plan(tmp_path):
    cluster = LocalCluster(ClusterSpec(workdir=tmp_path))
    assert cluster.gateway_address == "127.0.0.1:50050"
    assert cluster.gateway_http_url == "http://127.0.0.1:8000/v1"
    assert cluster.etcd_endpoint == "127.0.0.1:2379"
    assert cluster.workdir == tmp_path
    external = LocalCluster(ClusterSpec(workdir=tmp_path, etcd="10.0.0.9:2379"))
    assert external.etcd_endpoint == "10.0.0.9:2379"


@pytest.mark.parametrize("base", [8000, 51000, 60000, 65000])
def test_base_port_puts_grpc_then_metrics_ports_in_one_block(tmp_path, base):
    ports = plan(tmp_path, base_port=base)
    order = ["gateway", "tokenizer", "prefill-0", "decode-0"]
    assert [ports[n] for n in order] == [base, base + 1, base + 2, base + 3]
    assert [ports[n + "/metrics"] for n in order] == [base + 4, base + 5, base + 6, base + 7]
    assert ports["gateway/http"] == base + 8


def test_base_port_example(tmp_path):
    ports = plan(tmp_path, base_port=8000, num_decode=2)
    assert [ports[n] for n in ("gateway", "tokenizer", "prefill-0", "decode-0", "decode-1")] == [8000, 8001, 8002, 8003, 8004]
    assert [ports[n + "/metrics"] for n in ("gateway", "tokenizer", "prefill-0", "decode-0", "decode-1")] == [8005, 8006, 8007, 8008, 8009]


@pytest.mark.parametrize(
    "num_prefill, num_decode, grpc_order",
    [
        (1, 2, ["gateway", "tokenizer", "prefill-0", "decode-0", "decode-1"]),
        (2, 1, ["gateway", "tokenizer", "prefill-0", "prefill-1", "decode-0"]),
        (2, 3, ["gateway", "tokenizer", "prefill-0", "prefill-1", "decode-0", "decode-1", "decode-2"]),
        (0, 1, ["gateway", "tokenizer", "decode-0"]),
    ],
)
def test_more_workers_get_consecutive_distinct_ports(tmp_path, num_prefill, num_decode, grpc_order):
    ports = plan(tmp_path, num_prefill=num_prefill, num_decode=num_decode)
    assert [ports[n] for n in grpc_order] == list(range(50050, 50050 + len(grpc_order)))
    assert [ports[n + "/metrics"] for n in grpc_order] == list(range(9400, 9400 + len(grpc_order)))
    assert set(ports) == {"etcd", "etcd-peer", "gateway/http"} | set(grpc_order) | {n + "/metrics" for n in grpc_order}
    assert len(set(ports.values())) == len(ports)


def test_two_decode_workers(tmp_path):
    ports = plan(tmp_path, num_decode=2)
    assert (ports["decode-0"], ports["decode-1"]) == (50053, 50054)
    assert (ports["decode-0/metrics"], ports["decode-1/metrics"]) == (9403, 9404)


@pytest.mark.parametrize("num_prefill, num_decode", [(1, 1), (2, 3)])
def test_free_ports_plan_shape(tmp_path, num_prefill, num_decode):
    ports = plan(tmp_path, free_ports=True, num_prefill=num_prefill, num_decode=num_decode)
    services = ["gateway", "tokenizer"] + [f"prefill-{i}" for i in range(num_prefill)] + [f"decode-{i}" for i in range(num_decode)]
    assert set(ports) == {"etcd", "etcd-peer", "gateway/http"} | set(services) | {s + "/metrics" for s in services}
    assert all(1024 <= p <= 65535 for p in ports.values())


@pytest.mark.parametrize("free", [False, True])
def test_http_port_can_be_set_or_turned_off(tmp_path, free):
    assert plan(tmp_path, free_ports=free, http_port=9123)["gateway/http"] == 9123
    off = LocalCluster(ClusterSpec(workdir=tmp_path, free_ports=free, http_port=0))
    assert off.gateway_http_url is None
    assert off._make_service("gateway", "gateway").args[-2:] == ["--http-port", "0"]


def test_free_ports_are_all_distinct(tmp_path):
    # probing ports one socket at a time let the OS hand the same port out twice (about 1 plan in
    # 200 here); every probe socket now stays bound until the whole plan is chosen
    for _ in range(300):
        ports = plan(tmp_path, free_ports=True, num_prefill=2, num_decode=3)
        assert len(set(ports.values())) == len(ports), ports


def test_a_busy_etcd_port_is_replaced_by_a_free_one(monkeypatch):
    import socket

    import tandem.launcher

    monkeypatch.undo()  # the real port_or_free
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        other = tandem.launcher.port_or_free(busy)
        assert other != busy and 1024 <= other <= 65535
