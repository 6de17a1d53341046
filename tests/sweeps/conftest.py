"""Sweep test fixtures: the real local SLURM cluster (session-scoped, stopped at the end)."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
import slurm_cluster


@pytest.fixture(scope="session")
def slurm() -> Iterator[slurm_cluster.Cluster]:
    """A running single-node SLURM cluster (installed with apt-get if missing); stopped at the end."""
    try:
        cluster = slurm_cluster.start()
    except (slurm_cluster.ClusterUnavailable, subprocess.TimeoutExpired, OSError) as err:
        slurm_cluster.stop()
        pytest.skip(f"no local SLURM cluster: {err}")
    try:
        yield cluster
    finally:
        slurm_cluster.stop(cluster.root)
        os.environ.pop("SLURM_CONF", None)
