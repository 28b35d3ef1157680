"""The `slurm` fixture: a real one-node SLURM cluster for the session (see slurm_cluster.py)."""

from __future__ import annotations

import os

import pytest

from tests.launch.slurm_cluster import SKIP_ENV, LocalSlurm, SlurmError


@pytest.fixture(scope="session")
def slurm():
    """A started LocalSlurm; the tests fail (never skip silently) when SLURM cannot run here.
    A developer may skip them explicitly with SAM_DISTILL_SKIP_SLURM=1; CI never sets it."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(
            f"{SKIP_ENV}=1: the SLURM batch scripts are NOT tested in this run "
            "(unset it to test them; CI always does)"
        )
    cluster, problem = LocalSlurm(), None
    try:
        cluster.start()
    except SlurmError as err:
        problem = str(err)
    if problem:
        pytest.fail(problem, pytrace=False)
    yield cluster
    cluster.stop()
