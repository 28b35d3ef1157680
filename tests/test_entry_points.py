"""Every entry script starts from its own folder without shadowing a package, and answers --help."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

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


def _help(script) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,  # only catches a hang
    )


@pytest.fixture(scope="module")
def answers() -> dict:
    """Each script's --help, four at a time: most of a run is importing torch, which waits on the
    disk as much as on a core."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(SCRIPTS, pool.map(_help, SCRIPTS), strict=True))


def test_scripts_exist():
    assert "launch/cache_teacher.py" in {str(s) for s in SCRIPTS}


@pytest.mark.slow  # a Python with torch a script
@pytest.mark.parametrize("script", SCRIPTS, ids=str)
def test_help(script, answers):
    result = answers[script]
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
