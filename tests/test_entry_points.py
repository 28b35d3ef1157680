"""Every entry script starts from its own folder without shadowing a package, and answers --help."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPTS = sorted(
    p.relative_to(REPO)
    for d in ("launch", "launch/bench", "eval")
    for p in (REPO / d).glob("*.py")
    if not p.name.startswith("_")
    and p.name != "__init__.py"
    and p.read_text().find("__main__") >= 0
)


def test_scripts_exist():
    assert "launch/cache_teacher.py" in {str(s) for s in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=str)
def test_help(script):
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
