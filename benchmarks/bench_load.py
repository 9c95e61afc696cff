"""A steady `tandem bench` load in the background, for the reliability benchmark and the chaos tests.

`tandem bench` runs as its own process (as a user runs it): its client is then not slowed by the
test's own threads, and its result.json is exactly what the benchmark reports. The load is open
loop at a constant rate, so a fault lands on requests in every phase (queued, prefilling, mid-stream).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


class BenchLoad:
    def __init__(self, gateway: str, out: Path, duration: float, rate: float = 2.0, input_len: int = 32, output_len: int = 24,
                 vocab_size: int | None = None, request_timeout: float = 60.0, extra: tuple[str, ...] = ()):  # fmt: skip
        self.out = Path(out)
        self.cmd = [sys.executable, "-m", "tandem", "bench", "random", "--gateway", gateway, "--duration", str(duration),
                    "--request-rate", str(rate), "--burstiness", "inf", "--input-len", str(input_len), "--output-len", str(output_len),
                    "--request-timeout", str(request_timeout), "--connect-timeout", "30", "--out", str(self.out), "--no-plots", "--no-progress",
                    *(["--vocab-size", str(vocab_size)] if vocab_size else []), *extra]  # fmt: skip
        self.duration, self.request_timeout = duration, request_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "BenchLoad":
        self.out.mkdir(parents=True, exist_ok=True)
        self._log = open(self.out / "bench.log", "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def result(self) -> dict:
        """Wait for the run to end; its result.json, with the bench's output under "bench_log"."""
        rc = self.proc.wait(timeout=self.duration + 2 * self.request_timeout + 60)
        log = (self.out / "bench.log").read_text(errors="replace")
        if not (self.out / "result.json").exists():
            raise RuntimeError(f"tandem bench exited {rc} without a result:\n{log[-3000:]}")
        result = json.loads((self.out / "result.json").read_text())
        result["bench_log"] = log
        return result


def failures(result: dict) -> str:
    """The failed requests of a result, for an assertion message: count by status and examples."""
    return f"{result['failed']} failed of {result['completed'] + result['failed']}: {result['errors_by_status']}\n{result['bench_log'][-2000:]}"
