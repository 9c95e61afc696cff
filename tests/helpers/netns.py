"""A multi-host test bed on one machine: a Linux network namespace per "host", joined by a bridge.

    with NetnsBed(["etcd", "gateway", "prefill", "decode"]) as bed:
        bed.address("decode")                       # 198.18.0.4
        proc = bed.popen("decode", ["python", "-m", "tandem", "serve", "decode", "--host", ...], log)
        bed.partition("decode"); bed.heal("decode")  # pull the cable, plug it back
        bed.netem("decode", "delay", "20ms")        # a slow link (where the kernel has netem)

Layout: the bridge lives in a namespace of its own (nothing is added to the root namespace);
each host namespace has `lo` and an `eth0` (a veth whose peer is a port of that bridge) with an
address from 198.18.0.0/15 (RFC 2544's benchmarking range, never routed on the Internet). There
is no default route and no link to the root namespace, so traffic cannot leave the bed, and the
test process itself cannot reach a host: run clients inside one (`popen`, `run`).
Names resolve through a hosts file per namespace (/etc/netns/NS/hosts, which `ip netns exec`
bind-mounts over /etc/hosts), so `--etcd etcd:2379` works inside the bed.

Every name carries a per-bed random prefix, so parallel runs do not collide, and everything is
removed on exit, on an exception, and (through `atexit`) when the process ends without exiting the
context: processes still inside the namespaces are killed, then the namespaces and hosts files go.
Needs root and iproute2 (`unavailable_reason()` says what is missing).
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
SUBNET = ipaddress.ip_network("198.18.0.0/24")  # inside 198.18.0.0/15


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why the bed cannot be built here, or None: tries a namespace and a veth pair for real."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"tndprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace with a veth pair: {e}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class NetnsBed:
    def __init__(self, hosts: list[str]):
        if len(set(hosts)) != len(hosts) or not hosts:
            raise ValueError(f"host names must be unique and not empty, got {hosts}")
        self.hosts = list(hosts)
        self.prefix = f"tnd{secrets.token_hex(3)}"
        self.bridge_ns = f"{self.prefix}-br"
        addresses = list(SUBNET.hosts())
        self._addresses = {host: str(addresses[i]) for i, host in enumerate(hosts)}
        self._ports = {host: f"p{i}" for i, host in enumerate(hosts)}  # bridge ports, in the bridge namespace
        self._created: list[str] = []  # namespaces, in creation order
        self._closed = False

    # ---- names ----------------------------------------------------------------------------------
    def netns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def address(self, host: str) -> str:
        return self._addresses[host]

    # ---- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> NetnsBed:
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_netns(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{self.address(h)} {h}\n" for h in self.hosts)
        for host in self.hosts:
            ns, port = self.netns(host), self._ports[host]
            self._add_netns(ns)
            # both ends are created inside their namespaces: no interface ever appears in the root one
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/{SUBNET.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)

    def close(self) -> None:
        """Kill what still runs inside, delete the namespaces (and with them every veth and the
        bridge) and the hosts files. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for ns in reversed(self._created):
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # only processes inside this bed's own namespaces
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)

    # ---- running things inside ------------------------------------------------------------------
    def command(self, host: str, argv: list[str]) -> list[str]:
        """argv run inside `host` (its network namespace and its /etc/hosts)."""
        return ["ip", "netns", "exec", self.netns(host), *argv]

    def run(self, host: str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), capture_output=True, text=True, timeout=timeout)

    # ---- faults ---------------------------------------------------------------------------------
    def partition(self, host: str) -> None:
        """Unplug `host` from the bridge (a failed switch port or cable): packets to and from it are
        lost; established connections notice only by their timeouts, new ones when ARP fails."""
        _ip("-n", self.bridge_ns, "link", "set", self._ports[host], "down")

    def heal(self, host: str) -> None:
        _ip("-n", self.bridge_ns, "link", "set", self._ports[host], "up")

    def netem(self, host: str, *args: str) -> None:
        """Impair `host`'s outgoing packets with tc netem (`"delay", "20ms", "loss", "1%"`); no args
        removes it. Raises RuntimeError when tc fails, e.g. a kernel without sch_netem."""
        argv = ["tc", "qdisc", "replace", "dev", "eth0", "root", "netem", *args] if args else ["tc", "qdisc", "del", "dev", "eth0", "root"]
        result = self.run(host, argv)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {host}: {result.stderr.strip()}")
