"""The checks that keep the code readable run with the tests: lint, format, types, layers.

Each runs the tool the way a developer would from the repository root, so breaking a layer
contract, an unformatted file or a type error fails the test command, with the tool's own
message in the failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("lint-imports",), id="import-linter: the layers of docs/architecture.md"),
        pytest.param(("ruff", "check", "."), id="ruff check"),
        pytest.param(("ruff", "format", "--check", "."), id="ruff format --check"),
        pytest.param(("mypy",), id="mypy (the pure core at the strict flags)"),
    ],
)
def test_code_health(command):
    result = _run(str(BIN / command[0]), *command[1:])
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"


def test_breaking_a_layer_contract_fails_the_check(tmp_path):
    """A core module that imports the FHIR client is refused by lint-imports (shown on a copy of the tree)."""
    copy = tmp_path / "tree"
    copy.mkdir()
    for name in ("fhir_plugin", "smart_launch", "sandbox"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "target", ".run"))
    (copy / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    review = copy / "fhir_plugin" / "_review.py"
    review.write_text(review.read_text() + "\nfrom ._client import FhirClient  # a layer broken on purpose\n")
    env = {**os.environ, "PYTHONPATH": str(copy)}
    result = subprocess.run([str(BIN / "lint-imports")], cwd=copy, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "fhir_plugin._review -> fhir_plugin._client" in result.stdout
