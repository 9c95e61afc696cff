"""OpenAI-compatible servers the side-by-side benchmark starts and stops: `vllm serve` from its own
virtualenv, and `tandem up` in a given topology. Each runs in its own process group, is ready when
its `/health` answers 200 (Tandem's /health is readiness: a tokenizer and a decode worker up), and
is stopped with SIGINT, then SIGKILL of the whole group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .vllm_env import VllmInstall

MODEL_NAME = "default"  # what every server is asked for (vLLM: --served-model-name)


def wait_http_ok(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered; its log ends:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f}s (log: {log_path})")


@dataclass
class ServedTarget:
    label: str
    command: list[str]
    port: int
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, workdir: Path, timeout: float = 600) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.label}.log"
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        try:
            wait_http_ok(f"http://127.0.0.1:{self.port}/health", self.proc, self.log_path, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # what the group left behind (children of a launcher that was killed first)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def vllm_target(install: VllmInstall, model_dir: str, dtype: str, port: int, threads: int = 2) -> ServedTarget:
    cmd = install.script("vllm_cli.py") + [
        "serve", model_dir, "--served-model-name", MODEL_NAME, "--dtype", dtype, "--host", "127.0.0.1",
        "--port", str(port), "--max-model-len", "2048", "--seed", "0",
    ]  # fmt: skip
    return ServedTarget("vllm", cmd, port, install.env(threads))


# Tandem topologies compared on a small machine; the flags are `tandem up`'s
TANDEM_TOPOLOGIES = {
    "tandem-default": [],  # whatever `tandem up` does with no flags
    "tandem-1worker": ["--prefill", "0", "--decode", "1"],
    "tandem-1p1d": ["--prefill", "1", "--decode", "1"],
    "tandem-2workers": ["--prefill", "0", "--decode", "2"],
}


def tandem_target(label: str, dtype: str, http_port: int, base_port: int, workdir: Path, extra: list[str] = ()) -> ServedTarget:
    cmd = [sys.executable, "-m", "tandem", "up", "--dtype", dtype, "--http-port", str(http_port), "--base-port", str(base_port),
           "--workdir", str(workdir / label), *TANDEM_TOPOLOGIES.get(label, []), *extra]  # fmt: skip
    return ServedTarget(label, cmd, http_port)
