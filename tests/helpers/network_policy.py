"""Evaluates Kubernetes NetworkPolicies for a connection, as the API defines them, without a cluster.

    policies = [obj for obj in rendered if obj["kind"] == "NetworkPolicy"]
    allowed(policies, src, dst, 50051)   # may src open a TCP connection to dst's port 50051?

The semantics (https://kubernetes.io/docs/concepts/services-networking/network-policies/):
a pod selected by no policy of a type (Ingress/Egress) is not isolated for that direction; an
isolated pod admits a connection when any rule of any policy selecting it matches both the peer
and the port. A connection happens when the source's egress and the destination's ingress both
admit it. Peers: `podSelector` (the policy's namespace), `namespaceSelector` (with an optional
`podSelector`: both must match), `ipBlock` (for endpoints outside the cluster here); a missing or
empty `from`/`to` matches every peer, a missing or empty `ports` every port. Named ports resolve
against the destination's container ports. Only what the manifests here use is implemented:
unsupported constructs raise, so a new construct cannot pass unevaluated.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Endpoint:
    """One side of a connection: a pod (namespace set) or an address outside the cluster (namespace None)."""

    name: str
    namespace: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str = "10.0.0.1"
    named_ports: Mapping[str, int] = field(default_factory=dict)

    @property
    def namespace_labels(self) -> dict[str, str]:
        # the API server labels every namespace with its name
        return {"kubernetes.io/metadata.name": self.namespace} if self.namespace else {}


def selector_matches(selector: Mapping | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions); an empty selector matches everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": lambda: labels.get(key) in values,
            "NotIn": lambda: labels.get(key) not in values,
            "Exists": lambda: key in labels,
            "DoesNotExist": lambda: key not in labels,
        }[op]()
        if not ok:
            return False
    return True


def _policy_types(policy: Mapping) -> list[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return spec["policyTypes"]
    return ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]


def _peer_matches(peer: Mapping, policy_namespace: str, other: Endpoint) -> bool:
    unknown = set(peer) - {"podSelector", "namespaceSelector", "ipBlock"}
    if unknown:
        raise NotImplementedError(f"NetworkPolicy peer fields {sorted(unknown)}")
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        address = ipaddress.ip_address(other.ip)
        return address in ipaddress.ip_network(block["cidr"]) and not any(address in ipaddress.ip_network(cidr) for cidr in block.get("except") or [])
    if other.namespace is None:  # pod and namespace selectors only ever match pods
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector"), other.labels)


def _port_matches(rule_port: Mapping, port: int, protocol: str, destination: Endpoint) -> bool:
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    if "port" not in rule_port:
        return True
    first = rule_port["port"]
    if isinstance(first, str):
        if "endPort" in rule_port:
            raise ValueError("endPort requires a numeric port")
        return destination.named_ports.get(first) == port
    return first <= port <= rule_port.get("endPort", first)


def _admits(policies: Iterable[Mapping], pod: Endpoint, direction: str, other: Endpoint, port: int, protocol: str, destination: Endpoint) -> bool:
    """Does `pod`'s policy set admit the connection in `direction` (Ingress: from other; Egress: to other)?"""
    if pod.namespace is None:
        return True  # outside the cluster: no NetworkPolicy applies
    selecting = [
        p for p in policies
        if p["metadata"].get("namespace") == pod.namespace and direction in _policy_types(p)
        and selector_matches(p["spec"].get("podSelector"), pod.labels)
    ]  # fmt: skip
    if not selecting:
        return True  # not isolated in this direction
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in selecting:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key) or []
            ports = rule.get("ports") or []
            if peers and not any(_peer_matches(peer, pod.namespace, other) for peer in peers):
                continue
            if ports and not any(_port_matches(p, port, protocol, destination) for p in ports):
                continue
            return True
    return False


def allowed(policies: list[Mapping], src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """May `src` open a connection to `dst`:`port`? Both src's egress and dst's ingress must admit it."""
    return _admits(policies, src, "Egress", dst, port, protocol, dst) and _admits(policies, dst, "Ingress", src, port, protocol, dst)
