"""The code is fully typed: mypy --strict over the three code folders, as one `mcpherd` package.

mypy cannot follow setuptools' package-dir mapping (shared/root is `mcpherd`, worker/ is
`mcpherd.worker`, ...), so the test lays the package out with symlinks in a temporary directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_mypy_strict_reports_nothing(tmp_path: Path) -> None:
    package = tmp_path / "mcpherd"
    package.mkdir()
    for child in (ROOT / "shared" / "root").iterdir():
        (package / child.name).symlink_to(child)
    for folder in ("shared", "supervisor", "worker"):
        (package / folder).symlink_to(ROOT / folder)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports", "--no-incremental",
         "-p", "mcpherd"], cwd=tmp_path, capture_output=True, text=True, timeout=580)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success: no issues found"), result.stdout
