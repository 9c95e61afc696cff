"""deploy/kubernetes NetworkPolicies admit exactly the hops of the design, in every overlay.

Each overlay is rendered, one pod stands for each workload, and a few endpoints stand for the rest
of the world (a client outside the cluster, an unlabelled pod in Tandem's namespace, Prometheus in
`monitoring`, cluster DNS, an external etcd). Every (source, destination, port) is evaluated with
tests/helpers/network_policy.py and the set of admitted connections must equal the design's
(docs/architecture.md §1): anything more is an opening, anything less breaks serving.
"""

from __future__ import annotations

import pytest

from tests.helpers.kustomize import KUBERNETES_DIR, container_env, container_ports, find_kustomize, of_kind, pod_labels, pod_spec, render, workloads
from tests.helpers.network_policy import Endpoint, allowed

pytestmark = pytest.mark.skipif(find_kustomize()[0] is None, reason=find_kustomize()[1])

OVERLAYS = ("dev", "pd", "tls", "external-etcd")
TANDEM_ROLES = ("gateway", "tokenizer", "prefill", "decode")
EXTERNAL_ETCD_IP = "192.0.2.10"


def ucx_port_range(objects) -> tuple[int, int]:
    """UCX_TCP_PORT_RANGE of the workers: the same for prefill and decode (they dial each other)."""
    ranges = set()
    for workload in workloads(objects):
        if pod_labels(workload).get("app.kubernetes.io/component") in ("prefill", "decode"):
            env = container_env(pod_spec(workload)["containers"][0], objects)
            assert "UCX_TCP_PORT_RANGE" in env, f"{workload['metadata']['name']}: set UCX_TCP_PORT_RANGE so the policies can name the data plane"
            ranges.add(env["UCX_TCP_PORT_RANGE"])
    assert len(ranges) == 1, f"prefill and decode must use one UCX port range, got {ranges}"
    first, _, last = ranges.pop().partition("-")
    return int(first), int(last or first)


def endpoints(objects) -> dict[str, Endpoint]:
    namespace = workloads(objects)[0]["metadata"]["namespace"]
    found = {}
    for i, workload in enumerate(workloads(objects)):
        component = pod_labels(workload)["app.kubernetes.io/component"]
        ports = {name: number for c in pod_spec(workload)["containers"] for name, number in container_ports(c).items()}
        found[component] = Endpoint(component, namespace, pod_labels(workload), f"10.0.1.{i + 1}", ports)
    found["client"] = Endpoint("client", None, ip="203.0.113.7")
    found["stranger"] = Endpoint("stranger", namespace, {"app": "debug"}, "10.0.2.1")
    found["prometheus"] = Endpoint("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, "10.0.3.1")
    found["dns"] = Endpoint("dns", "kube-system", {"k8s-app": "kube-dns"}, "10.0.4.1")
    if "etcd" not in found:
        found["external-etcd"] = Endpoint("external-etcd", None, ip=EXTERNAL_ETCD_IP)
    return found


def design_hops(objects) -> set[tuple[str, str, int, str]]:
    """The connections the design needs, as (source, destination, port, protocol)."""
    ucx_first, ucx_last = ucx_port_range(objects)
    eps = endpoints(objects)
    etcd = "etcd" if "etcd" in eps else "external-etcd"
    outsiders = [name for name in ("client", "stranger", "prometheus", "dns", "external-etcd") if name in eps]  # unrestricted egress
    hops = {(src, "gateway", port, "TCP") for src in outsiders for port in (50050, 8000)}
    hops |= {("gateway", "tokenizer", 50051, "TCP"), ("gateway", "prefill", 50052, "TCP"), ("gateway", "decode", 50053, "TCP")}
    for port in (ucx_first, ucx_last):
        hops |= {("decode", "prefill", port, "TCP"), ("prefill", "decode", port, "TCP")}
    tandem_pods = [name for name in eps if name in (*TANDEM_ROLES, "etcd")]
    hops |= {(src, etcd, 2379, "TCP") for src in tandem_pods}
    hops |= {(src, "dns", 53, proto) for src in tandem_pods for proto in ("TCP", "UDP")}
    if etcd == "etcd":
        hops |= {("etcd", "etcd", 2380, "TCP")}
    hops |= {("prometheus", role, eps[role].named_ports["metrics"], "TCP") for role in TANDEM_ROLES}
    if "etcd" in eps:  # on the port its scrape annotation names (2381, plaintext, under the tls overlay)
        hops |= {("prometheus", "etcd", etcd_metrics_port(objects), "TCP")}
    return hops


def etcd_metrics_port(objects) -> int:
    (etcd,) = [w for w in workloads(objects) if pod_labels(w).get("app.kubernetes.io/component") == "etcd"]
    return int(etcd["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])


def admitted(objects) -> set[tuple[str, str, int, str]]:
    """Every (source, destination, port, protocol) the policies let through, over the ports in play."""
    policies = of_kind(objects, "NetworkPolicy")
    eps = endpoints(objects)
    ucx_first, ucx_last = ucx_port_range(objects)
    probe_ports = {port for ep in eps.values() for port in ep.named_ports.values()}
    probe_ports |= {53, 2379, ucx_first - 1, ucx_first, ucx_last, ucx_last + 1}
    result = set()
    for src in eps.values():
        for dst in eps.values():
            for port in sorted(probe_ports):
                for proto in ("TCP", "UDP"):
                    if allowed(policies, src, dst, port, proto):
                        result.add((src.name, dst.name, port, proto))
    return result


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policies_admit_exactly_the_design_hops(overlay):
    objects = render(KUBERNETES_DIR / "overlays" / overlay)
    got, want = admitted(objects), design_hops(objects)
    # outsiders are not ours to restrict: only what reaches Tandem's pods (or leaves them) counts
    got = {h for h in got if h[1] in (*TANDEM_ROLES, "etcd") or h[0] in (*TANDEM_ROLES, "etcd")}
    assert not got - want, f"{overlay}: admitted beyond the design: {sorted(got - want)}"
    assert not want - got, f"{overlay}: the design needs, but the policies block: {sorted(want - got)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_tandem_pod_is_isolated_both_ways(overlay):
    objects = render(KUBERNETES_DIR / "overlays" / overlay)
    policies = of_kind(objects, "NetworkPolicy")
    for name, ep in endpoints(objects).items():
        if name in (*TANDEM_ROLES, "etcd"):
            stranger = Endpoint("nowhere", None, ip="198.51.100.1")
            assert not allowed(policies, ep, stranger, 443), f"{overlay}: {name} may connect anywhere"
            if name != "gateway":
                assert not allowed(policies, stranger, ep, ep.named_ports.get("grpc", 2379)), f"{overlay}: anyone may connect to {name}"


def test_the_evaluator_tells_allowed_from_blocked():
    # the evaluator itself, on a hand-made policy: a wrong evaluator would make the tests above vacuous
    policy = {
        "metadata": {"name": "p", "namespace": "a"},
        "spec": {
            "podSelector": {"matchLabels": {"role": "db"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "app"}}}], "ports": [{"port": 5000, "endPort": 5010}]}],
        },
    }
    db, app = Endpoint("db", "a", {"role": "db"}), Endpoint("app", "a", {"role": "app"})
    app_elsewhere, other = Endpoint("app2", "b", {"role": "app"}), Endpoint("other", "a", {"role": "web"})
    assert allowed([policy], app, db, 5005)
    assert not allowed([policy], app, db, 5011)
    assert not allowed([policy], app, db, 5005, "UDP")
    assert not allowed([policy], app_elsewhere, db, 5005), "a bare podSelector matches the policy's namespace only"
    assert not allowed([policy], other, db, 5005)
    assert allowed([policy], db, other, 80), "pods no policy selects are not isolated"
