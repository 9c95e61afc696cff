"""LocalCluster: the whole of Tandem on this machine as child processes (what `tandem up` runs).

    etcd → tokenizer → prefill × N → decode × N → gateway      (started in this order)
    gateway → decode → prefill → tokenizer → etcd              (stopped in this order, SIGTERM)

Every service is `python -m tandem serve ROLE` with its ports and the cluster's etcd on the
command line, exactly what a container runs. Children get SIGTERM if the launcher dies, and
start() either returns with every service SERVING or stops what it started and raises.
With `restart` (what `tandem up` sets), a Supervisor (supervisor.py) then brings back any service
that exits — same worker id, ports and flags — and etcd with its data dir; stop() ends the
supervision before it stops the children. The integration tests use this class too, on free ports.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import DEFAULT_GRPC_PORTS, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORTS

from .etcd_process import EtcdProcess
from .health import check_health
from .processes import popen_child, stop_child
from .supervisor import RestartPolicy, Supervisor, SupervisorEvent

log = logging.getLogger("tandem.supervisor")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket stays bound until all are chosen, so none repeats."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_or_free(port: int) -> int:
    """`port` if nothing listens there, else a free one (a system etcd often holds 2379 already)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as etcd binds: TIME_WAIT is free
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            return free_port()


@dataclass
class ServiceProcess:
    role: str
    name: str  # unique in the cluster: decode-0, decode-1, ...
    port: int
    metrics_port: int
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    tls_dir: Path | None = None  # `tandem certs` directory when the cluster runs with TLS
    started_unix: float = 0.0  # when its current process was spawned (time.time())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "tandem", "serve", self.role, "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), "--worker-id", self.name, *self.args]  # fmt: skip
        self.started_unix = time.time()
        self.proc = popen_child(cmd, self.log_path, self.env)

    # what the Supervisor calls (supervisor.Child)
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def restart(self) -> None:
        self.start()

    def is_serving(self, timeout: float = 0.5) -> bool:
        return check_health(self.address, timeout=timeout, tls_dir=self.tls_dir, role=self.role)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


@dataclass
class ClusterSpec:
    model: str = "default"
    num_prefill: int = 1
    num_decode: int = 1
    tokenizer: bool = True  # False: clients send token ids (a model directory without tokenizer.json)
    cluster: str = "default"
    etcd: str | None = None  # an external etcd host:port; None = start our own
    base_port: int | None = None  # gateway's port; others follow. None = the roles' defaults
    http_port: int | None = None  # the gateway's OpenAI HTTP API; None = from the plan (8000 by default), 0 = off
    free_ports: bool = False  # pick free ports (tests, or several clusters on one host)
    metrics: bool = True
    lease_ttl: int = 10
    worker_args: list[str] = field(default_factory=list)  # extra flags for prefill and decode
    service_args: list[str] = field(default_factory=list)  # extra flags for every service
    role_args: dict[str, list[str]] = field(default_factory=dict)  # extra flags for one role ("gateway": [...])
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None  # logs and etcd data; default: a temp dir
    # supervise once started: restart services (and our etcd) that exit. Off by default so that tests
    # which kill a service see it stay dead; `tandem up` turns it on
    restart: bool = False
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    # mTLS on every gRPC hop and TLS on the gateway's gRPC port, with dev certificates made in
    # workdir/certs (tandem/certs.py)
    tls: bool = False
    # with tls and our own etcd: etcd's user/password auth on too, services as user `tandem` limited
    # to /tandem/<cluster>/ (etcd_auth_setup.py; passwords in workdir/certs, 0600)
    etcd_auth: bool = True


class LocalCluster:
    def __init__(self, spec: ClusterSpec, on_event: Callable[[SupervisorEvent], None] | None = None):
        """on_event: also told of every supervision event (restarts, give-ups), e.g. to print them."""
        self.spec = spec
        self.workdir = Path(spec.workdir or tempfile.mkdtemp(prefix="tandem-"))
        self.etcd: EtcdProcess | None = None
        self.etcd_auth = None  # EtcdAuthFiles once our etcd's auth is on
        self.services: list[ServiceProcess] = []
        self.supervisor: Supervisor | None = None
        self._on_event = on_event
        self._ports = self._port_plan()
        # our own etcd with --tls: https, and every service dials it with its certificate
        self.etcd_endpoint = spec.etcd or f"{'https://' if spec.tls else ''}127.0.0.1:{self._ports['etcd']}"

    def _port_plan(self) -> dict[str, int]:
        s = self.spec
        names = ["etcd", "etcd-peer", "gateway", "tokenizer"] + [f"prefill-{i}" for i in range(s.num_prefill)] + [f"decode-{i}" for i in range(s.num_decode)]
        if s.free_ports:
            keys = names + [f"{n}/metrics" for n in names[2:]] + ["gateway/http"]
            plan = dict(zip(keys, free_ports(len(keys))))
            if s.http_port is not None:
                plan["gateway/http"] = s.http_port
            return plan
        # gateway, tokenizer, prefill-0, decode-0 land on the roles' default ports (as in containers)
        # and more workers continue the sequence; with another base port, the metrics ports follow
        # right after the gRPC ports
        base = s.base_port or DEFAULT_GRPC_PORTS["gateway"]
        metrics_base = DEFAULT_METRICS_PORTS["gateway"] if s.base_port is None else base + len(names) - 2
        plan = {"etcd": port_or_free(2379), "etcd-peer": port_or_free(2380)}
        for i, n in enumerate(names[2:]):
            plan[n], plan[f"{n}/metrics"] = base + i, metrics_base + i
        # the HTTP API: its default port, or right after the metrics ports when the base moved
        plan["gateway/http"] = s.http_port if s.http_port is not None else DEFAULT_HTTP_PORT if s.base_port is None else metrics_base + len(names) - 2
        return plan

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self._ports['gateway']}"

    @property
    def gateway_http_url(self) -> str | None:
        """The OpenAI API's base URL (what `openai.OpenAI(base_url=...)` takes); None when off."""
        port = self._ports["gateway/http"]
        return f"{'https' if self.spec.tls else 'http'}://127.0.0.1:{port}/v1" if port else None

    def service(self, name: str) -> ServiceProcess:
        return next(s for s in self.services if s.name == name)

    def _make_service(self, role: str, name: str) -> ServiceProcess:
        s = self.spec
        args = ["--etcd", self.etcd_endpoint, "--cluster", s.cluster, "--lease-ttl", str(s.lease_ttl), *s.service_args]
        if role != "gateway":
            args += ["--model", s.model]
        if role in ("prefill", "decode"):
            args += s.worker_args
        if role == "gateway":
            args += ["--http-port", str(self._ports["gateway/http"])]
        tls_dir = self.workdir / "certs" if s.tls else None
        if tls_dir is not None:
            args += ["--tls-cert", str(tls_dir / f"{role}.pem"), "--tls-key", str(tls_dir / f"{role}-key.pem"), "--tls-ca", str(tls_dir / "ca.pem")]
        if self.etcd_auth is not None:  # the password's file, never the password: argv is public
            args += ["--etcd-username", self.etcd_auth.username, "--etcd-password-file", str(self.etcd_auth.password_file)]
        args += s.role_args.get(role, [])
        metrics_port = self._ports[f"{name}/metrics"] if s.metrics else 0
        return ServiceProcess(role, name, self._ports[name], metrics_port, args, self.workdir / f"{name}.log", dict(s.env), tls_dir=tls_dir)

    def start(self, timeout: float = 120.0) -> None:
        """Start etcd (unless external) and every service; wait until all are SERVING."""
        try:
            if self.spec.tls:  # before etcd: it serves with its certificate too
                from .certs import create as create_certs

                create_certs(self.workdir / "certs")
            if self.spec.etcd is None:
                tls_dir = self.workdir / "certs" if self.spec.tls else None
                self.etcd = EtcdProcess(self.workdir / "etcd-data", self._ports["etcd"], self._ports["etcd-peer"], self.workdir / "etcd.log", tls_dir=tls_dir)
                self.etcd.start()
                self.etcd.wait_healthy()
                if self.spec.tls and self.spec.etcd_auth:
                    self._enable_etcd_auth(tls_dir)
            s = self.spec
            plan = [("tokenizer", "tokenizer")] if s.tokenizer else []
            plan += [("prefill", f"prefill-{i}") for i in range(s.num_prefill)]
            plan += [("decode", f"decode-{i}") for i in range(s.num_decode)] + [("gateway", "gateway")]
            for role, name in plan:
                svc = self._make_service(role, name)
                svc.start()
                self.services.append(svc)
            deadline = time.monotonic() + timeout
            for svc in self.services:
                self.wait_serving(svc, deadline)
            if s.restart:
                self._supervise()
        except BaseException:
            self.stop()
            raise

    def _enable_etcd_auth(self, tls_dir: Path) -> None:
        from services.common.tls import TlsFiles

        from .etcd_auth_setup import enable_auth

        client = TlsFiles(str(tls_dir / "client.pem"), str(tls_dir / "client-key.pem"), str(tls_dir / "ca.pem"))
        self.etcd_auth = enable_auth(self.etcd_endpoint, self.spec.cluster, tls_dir, tls=client)

    def wait_serving(self, svc: ServiceProcess, deadline: float) -> None:
        while True:
            if svc.proc.poll() is not None:
                raise RuntimeError(f"{svc.name} exited with code {svc.proc.returncode}; its log ({svc.log_path}) ends:\n{svc.log_tail()}")
            if svc.is_serving(timeout=1.0):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{svc.name} not SERVING at {svc.address} in time; its log ({svc.log_path}) ends:\n{svc.log_tail()}")
            time.sleep(0.2)

    def _supervise(self) -> None:
        """Start supervising: only after every service served once, so a service that cannot start
        at all fails start() instead of looping."""
        self.supervisor = Supervisor(self.spec.restart_policy, self._supervisor_event)
        if self.etcd is not None:
            self.supervisor.add(self.etcd, critical=True)
        for svc in self.services:
            self.supervisor.add(svc)
        self.supervisor.start()

    def _supervisor_event(self, event: SupervisorEvent) -> None:
        """Log it, and mark it in the child's own log, where its next run's output follows."""
        (log.warning if event.kind in ("exited", "gave_up", "fatal") else log.info)("%s", event.message)
        path = self.etcd.log_path if self.etcd is not None and event.name == "etcd" else next((s.log_path for s in self.services if s.name == event.name), None)
        if path is not None:
            try:
                with open(path, "a") as f:
                    f.write(f"--- tandem supervisor {time.strftime('%Y-%m-%d %H:%M:%S')}: {event.message} ---\n")
            except OSError:
                pass
        if self._on_event is not None:
            self._on_event(event)

    def restarts(self, name: str) -> int:
        """How often the supervisor restarted `name` (0 when not supervised)."""
        return 0 if self.supervisor is None else self.supervisor.restarts(name)

    def stop(self, timeout: float = 30.0) -> None:
        """End supervision, then SIGTERM every service (gateway first) and wait; SIGKILL what
        outlives `timeout`. Idempotent."""
        if self.supervisor is not None:
            self.supervisor.stop()
        for svc in reversed(self.services):
            if svc.proc is not None and svc.proc.poll() is None:
                svc.proc.send_signal(15)
        for svc in reversed(self.services):
            if svc.proc is not None:
                stop_child(svc.proc, timeout)
        if self.etcd is not None:
            self.etcd.stop()

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
