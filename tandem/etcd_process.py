"""EtcdProcess: a private etcd for `tandem up` and the tests, on loopback ports, in its own data dir."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from .processes import popen_child, stop_child

INSTALL_HINT = (
    "etcd is not on PATH. Install it (Debian/Ubuntu: `sudo apt-get install -y etcd-server`; "
    "elsewhere: https://etcd.io/docs/latest/install/), or point Tandem at a running etcd with --etcd HOST:PORT."
)


# Debian installs etcd in /usr/bin, which a minimal PATH (cron, systemd units) can still miss
ETCD_FALLBACK_PATHS = ("/usr/bin/etcd", "/usr/local/bin/etcd")


class EtcdNotFoundError(RuntimeError):
    pass


def find_etcd() -> str:
    path = shutil.which("etcd") or next((p for p in ETCD_FALLBACK_PATHS if Path(p).is_file()), None)
    if path is None:
        raise EtcdNotFoundError(INSTALL_HINT)
    return path


class EtcdProcess:
    def __init__(self, data_dir: Path, client_port: int, peer_port: int, log_path: Path | None = None, tls_dir: Path | None = None):
        """tls_dir (a `tandem certs` directory): serve clients over TLS and require a client
        certificate of that CA (--client-cert-auth); the peer port stays loopback-only plaintext."""
        self.data_dir, self.client_port, self.peer_port = Path(data_dir), client_port, peer_port
        self.tls_dir = Path(tls_dir) if tls_dir is not None else None
        self.log_path = log_path or self.data_dir.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        """What services take as --etcd (https:// when TLS: they dial it with their certificate)."""
        return f"https://127.0.0.1:{self.client_port}" if self.tls_dir else f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        """Start etcd (keeping its data dir, so a restart keeps leases and keys)."""
        binary = find_etcd()
        scheme = "https" if self.tls_dir else "http"
        client_url, peer_url = f"{scheme}://127.0.0.1:{self.client_port}", f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            binary,
            "--name", "tandem",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"tandem={peer_url}",
            "--log-level", "warn",
        ]  # fmt: skip
        if self.tls_dir is not None:
            d = self.tls_dir
            cmd += ["--cert-file", str(d / "etcd.pem"), "--key-file", str(d / "etcd-key.pem"),
                    "--client-cert-auth", "--trusted-ca-file", str(d / "ca.pem")]  # fmt: skip
        self.proc = popen_child(cmd, self.log_path)

    def wait_healthy(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with code {self.proc.returncode}; see {self.log_path}")
            if self.is_serving():
                return
            time.sleep(0.1)
        raise TimeoutError(f"etcd at {self.endpoint} not healthy after {timeout:.0f}s; see {self.log_path}")

    # what the Supervisor calls (supervisor.Child): etcd restarts with its data dir, so the
    # services' leases and keys survive a crash of etcd alone
    name = "etcd"

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def restart(self) -> None:
        self.start()

    def is_serving(self) -> bool:
        context = None
        if self.tls_dir is not None:
            import ssl

            context = ssl.create_default_context(cafile=str(self.tls_dir / "ca.pem"))
            context.load_cert_chain(str(self.tls_dir / "client.pem"), str(self.tls_dir / "client-key.pem"))
        url = self.endpoint if self.tls_dir else f"http://{self.endpoint}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=0.5, context=context) as r:
                return json.load(r).get("health") == "true"
        except (OSError, ValueError):
            return False

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is not None:
            stop_child(self.proc, timeout)
            self.proc = None
