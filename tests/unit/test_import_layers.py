"""The package layers hold (DESIGN §2; the contracts are [tool.importlinter] in pyproject.toml):
`lint-imports` follows every import, direct or through other modules, so the gateway, the load
tests, the shared plumbing and the tokenizer service cannot start importing torch or the engine
by accident, and no package imports one above its layer. CI, which runs this suite, fails on a
broken contract with import-linter's report of the offending import chains."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    if exe.exists():
        return str(exe)
    found = shutil.which("lint-imports")
    if found is None:
        pytest.fail("import-linter is not installed: it is in the project's test extra (pip install -e '.[test]')")
    return found


def test_import_contracts_are_kept():
    # --no-cache: a stale cache could hide a new import, and the tree stays free of cache files
    done = subprocess.run([lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_every_services_package_has_a_layer():
    """A new package under services/ joins the layers contract, or it would escape every check."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c["layers"] for c in config["contracts"] if c["type"] == "layers")
    in_layers = {name.strip() for layer in layers for name in layer.split("|")}
    packages = {f"services.{p.parent.name}" for p in (ROOT / "services").glob("*/__init__.py")}
    assert packages - in_layers == set(), "add these packages to the layers contract in pyproject.toml"
