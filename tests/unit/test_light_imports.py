"""The gateway and the tokenizer service stay light: neither imports torch (DESIGN §2)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["gateway.service", "services.tokenizer.service", "tandem.launcher", "tandem.client"])
def test_module_does_not_import_torch(module):
    code = f"import sys, {module}; sys.exit(3 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{module} imports torch" if result.returncode == 3 else result.stderr
