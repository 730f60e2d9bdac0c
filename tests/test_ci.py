"""CI runs the README's two commands as written there, and cannot skip the PyTorch reference tests."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def _readme_commands_module():
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_takes_both_commands_from_the_readme():
    module = _readme_commands_module()
    commands = module.readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert commands == {"demo": "g2e-jax demo", "tests": "python -m pytest tests -q -n 2"}
    script = (ROOT / ".ci" / "run").read_text()
    assert "python .ci/readme_commands.py demo" in script and "python .ci/readme_commands.py tests" in script
    # No second copy of either command in the script (comments aside).
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert "g2e-jax demo" not in code and "pytest" not in code
    # The same CPU torch pin in the README's install lines and in CI's.
    pins = {re.search(r"torch==[\d.]+", text).group() for text in (script, (ROOT / "README.md").read_text())}
    assert len(pins) == 1
    command = [sys.executable, ".ci/readme_commands.py", "demo"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "g2e-jax demo\n"


def test_marked_blocks_must_be_single_commands():
    module = _readme_commands_module()
    text = "<!-- ci:demo -->\n```bash\ng2e-jax demo\n```\n"
    assert module.readme_commands(text) == {"demo": "g2e-jax demo"}
    with pytest.raises(ValueError, match="exactly one command line, found 2"):
        module.readme_commands("<!-- ci:demo -->\n```bash\ncd x\ng2e-jax demo\n```\n")
    with pytest.raises(ValueError, match="marks ci:demo twice"):
        module.readme_commands(text + "\n" + text)


def test_ci_makes_a_missing_reference_package_fatal(tmp_path):
    """Under CI=true the PyTorch parity tests may not skip for want of torch: the session stops."""
    (tmp_path / "torch.py").write_text("raise ImportError('torch is broken here')\n")
    env = dict(os.environ, CI="true", PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_ci.py"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "CI=true but torch cannot be imported (torch is broken here)" in result.stdout + result.stderr
    env["CI"] = "false"
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
