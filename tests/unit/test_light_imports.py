"""The gateway and the tokenizer service stay light: neither imports torch (DESIGN §2)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["gateway.service", "gateway.openai_api.server", "services.tokenizer.service", "tandem.launcher", "tandem.client"])
def test_module_does_not_import_torch(module):
    code = f"import sys, {module}; sys.exit(3 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{module} imports torch" if result.returncode == 3 else result.stderr


def test_the_openai_bench_target_imports_neither_torch_nor_the_gateway():
    code = "import sys, loadtest.openai_target; bad = [m for m in sys.modules if m == 'torch' or m.startswith(('services.engine', 'gateway'))]; sys.exit(3 if bad else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr or "loadtest.openai_target imports torch, the engine or the gateway"
